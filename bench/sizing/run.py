"""imgcache sizing, checked against a real imgcache and timed.

    .venv/bin/python -m bench.sizing.run            # everything (about 15 min on 2 cores)
    .venv/bin/python -m bench.sizing.run --only validate|speed|hitcost [--quick]

- validate: a synthetic trace (Zipf popularity over 1,000+ images, sizes from 200 MiB to
  20 GiB scaled down by 1/1024, and a rollout where new versions of the most popular images
  replace the old ones halfway) is replayed through a real `imgcache serve` in front of a
  Glance stand-in, from a cold cache, once per cap. Each server's own `imgcache sizing`
  prediction is compared with what its imgcache_requests_total and served bytes measured.
  The replay is sequential and waits for each fill to commit before the next request (the
  server puts a filled image at the most recently used end when its fill commits, so
  overlapping downloads would order recency differently from the requests).
- speed: `imgcache sizing` over a 10-million-request history, in a fresh process (imports,
  compiling the kernel, reading the files, 6 caps), against the kernel's code run by the
  Python interpreter on a slice, extrapolated.
- hitcost: server CPU per small cache hit with the history on and off, alternating.

Results: bench/results/sizing.md and bench/results/sizing.png.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common.imgcache_server import Imgcache, imgcache_binary
from bench.common.lifecycle import argument_parser, exit_status, progress, temp_dir
from bench.common.paths import RESULTS, WORK
from bench.common.procs import Processes, free_port
from imgcache.curve import one_pass, stack_distances
from imgcache.history_files import CURRENT, HEADER, MAGIC, RECORD, VERSION
from imgcache.sizing_cli import plot_png

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SCALE = 1024
#: Real image sizes: (share of images, smallest, largest), log-uniform within a band.
SIZE_BANDS = ((0.3, 200 * MiB, 700 * MiB), (0.4, 1 * GiB, 4 * GiB),
              (0.2, 4 * GiB, 10 * GiB), (0.1, 10 * GiB, 20 * GiB))
TOKEN = "token-a"


def catalogue_sizes(rng: np.random.Generator, images: int) -> np.ndarray:
    """Scaled sizes of ``images`` images drawn from SIZE_BANDS."""
    shares = np.array([band[0] for band in SIZE_BANDS])
    band = rng.choice(len(SIZE_BANDS), size=images, p=shares / shares.sum())
    low = np.log([SIZE_BANDS[b][1] for b in band])
    high = np.log([SIZE_BANDS[b][2] for b in band])
    return (np.exp(rng.uniform(low, high)) // SCALE).astype(np.int64)


def make_trace(rng: np.random.Generator, images: int, requests: int, alpha: float,
               rollouts: int) -> tuple[np.ndarray, np.ndarray]:
    """(sizes per image, image index per request): Zipf(alpha) over ``images`` images; at
    the halfway point the ``rollouts`` most popular ones are replaced by new versions
    (new images of about the same size) that take over their popularity."""
    sizes = catalogue_sizes(rng, images)
    popularity = 1 / np.arange(1, images + 1) ** alpha
    trace = rng.choice(images, size=requests, p=popularity / popularity.sum())
    versions = images + np.arange(rollouts)
    second_half = np.arange(requests) >= requests // 2
    for rank in range(rollouts):
        trace[second_half & (trace == rank)] = versions[rank]
    new_sizes = (sizes[:rollouts] * rng.uniform(0.95, 1.05, rollouts)).astype(np.int64)
    return np.concatenate([sizes, new_sizes]), trace


class Standin:
    """``python -m imgcache.standin`` serving one image per size."""

    def __init__(self, procs: Processes, workdir: Path, sizes: np.ndarray) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        sizes_file = workdir / "sizes.txt"
        sizes_file.write_text(" ".join(str(int(s)) for s in sizes))
        self.proc = procs.start(
            [sys.executable, "-m", "imgcache.standin", "--port", str(free_port()),
             "--data-dir", str(workdir / "glance"), "--image-sizes", str(sizes_file),
             "--token", TOKEN], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        self.url: str = info["url"]
        self.ids: list[str] = info["image_ids"]


def replay(server: Imgcache, ids: list[str], trace: np.ndarray) -> dict[str, int]:
    """Send the trace's requests one after another; after each MISS wait until its fill
    committed. Returns the X-Cache-Status counts."""
    counts: dict[str, int] = {}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    for index in trace:
        connection.request("GET", f"/v2/images/{ids[index]}/file",
                           headers={"X-Auth-Token": TOKEN})
        response = connection.getresponse()
        while response.read(1 << 20):
            pass
        if response.status != 200:
            raise RuntimeError(f"GET of {ids[index]}: status {response.status}")
        status = response.headers["X-Cache-Status"]
        counts[status] = counts.get(status, 0) + 1
        if status == "MISS":
            while server.metrics().get("imgcache_fills_in_progress", 0):
                time.sleep(0.005)
    connection.close()
    return counts


def measured(server: Imgcache) -> dict[str, float]:
    """Hit ratios from the server's own counters (COALESCED counts as a hit)."""
    samples = server.metrics()

    def total(name: str, results: tuple[str, ...]) -> float:
        return sum(samples[f'{name}{{result="{r}"}}'] for r in results)

    served = ("hit", "miss", "coalesced", "bypass")
    return {"hit_ratio": total("imgcache_requests_total", ("hit", "coalesced"))
            / total("imgcache_requests_total", served),
            "byte_hit_ratio": total("imgcache_served_bytes_total", ("hit", "coalesced"))
            / total("imgcache_served_bytes_total", served),
            **{r: samples[f'imgcache_requests_total{{result="{r}"}}'] for r in served}}


def sizing_json(server: Imgcache, caps: list[int], *more: str) -> list[dict[str, Any]]:
    """``imgcache sizing --json`` against the running server."""
    done = subprocess.run([str(imgcache_binary()), "sizing", "--socket",
                           str(server.admin_socket), "--json", "--caps",
                           ",".join(map(str, caps)), *more],
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"imgcache sizing failed: {done.stderr}")
    return json.loads(done.stdout)


def validate(args: argparse.Namespace, procs: Processes, work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(12)
    images, requests = (1000, 1200) if args.quick else (1000, 3000)
    sizes, trace = make_trace(rng, images, requests, alpha=0.9, rollouts=5)
    caps = [16 * MiB, 64 * MiB, 160 * MiB, 400 * MiB, 1 * GiB]
    progress(f"validate: {images + 5} images ({sizes.sum() / GiB:.1f} GiB scaled), "
             f"{requests} requests, caps {[c // MiB for c in caps]} MiB")
    standin = Standin(procs, work, sizes)
    dense = sorted(set(caps) | {int(c) for c in np.geomspace(8 * MiB, 2 * GiB, 25)})
    rows, curve = [], None
    for cap in caps:
        started = time.monotonic()
        server = Imgcache(procs, work / f"cap-{cap}", standin.url, cap)
        server.start()
        counts = replay(server, standin.ids, trace)
        got = measured(server)
        predicted = sizing_json(server, caps)[caps.index(cap)]
        if curve is None:
            curve = sizing_json(server, dense, "--policies")
            example = subprocess.run(
                [str(imgcache_binary()), "sizing", "--socket", str(server.admin_socket)],
                capture_output=True, text=True, timeout=600, check=True).stdout
        server.stop()
        subprocess.run(["rm", "-rf", str(server.cache_dir)], check=True)
        rows.append({"cap": cap, "measured": got, "predicted": predicted, "counts": counts,
                     "seconds": time.monotonic() - started})
        progress(f"  cap {cap // MiB} MiB: measured {got['hit_ratio']:.4f} / "
                 f"{got['byte_hit_ratio']:.4f}, predicted {predicted['hit_ratio']:.4f} / "
                 f"{predicted['byte_hit_ratio']:.4f} ({time.monotonic() - started:.0f} s)")
    procs.stop(standin.proc)
    return {"images": images + 5, "requests": requests, "catalogue_bytes": int(sizes.sum()),
            "rows": rows, "curve": curve, "example": example}


def write_history(path: Path, requests: int, images: int, seed: int = 5) -> None:
    """A synthetic 10M-style history file: Zipf(0.9) over ``images`` images."""
    rng = np.random.default_rng(seed)
    ids = np.frombuffer(rng.bytes(16 * images), dtype="V16")
    sizes = catalogue_sizes(rng, images) * SCALE
    popularity = 1 / np.arange(1, images + 1) ** 0.9
    chosen = rng.choice(images, size=requests, p=popularity / popularity.sum())
    records = np.zeros(requests, dtype=[("size", "<u8"), ("image", "V16"), ("time", "<u4"),
                                        ("result", "u1"), ("spare", "V3")])
    records["size"], records["image"] = sizes[chosen], ids[chosen]
    records["time"] = 1_700_000_000 + np.arange(requests, dtype=np.uint32) // 100
    path.mkdir(parents=True, exist_ok=True)
    with (path / CURRENT).open("wb") as handle:
        handle.write(HEADER.pack(MAGIC, VERSION, RECORD.size))
        records.tofile(handle)
    (path / "state.json").write_text(json.dumps({"max_bytes": 2000 * GiB, "pinned": {}}))


def speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    requests = 2_000_000 if args.quick else 10_000_000
    history = work / "speed" / "history"
    write_history(history, requests, images=20_000)
    progress(f"speed: imgcache sizing over {requests:,} requests")
    walls = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([str(imgcache_binary()), "sizing", "--cache-dir",
                               str(history.parent), "--json"], capture_output=True,
                              text=True, check=False)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
    answer = json.loads(done.stdout)
    assert answer[0]["history_requests"] == requests
    # Baseline in the same run: the kernel's own Python code run by the interpreter (numpy
    # arrays indexed from Python) over a slice, against the compiled kernel on that slice.
    rng = np.random.default_rng(1)
    slice_image = rng.integers(0, 20_000, 300_000)
    slice_sizes = rng.integers(200, 20_000, 20_000) * MiB
    stack_distances(slice_image[:1000], slice_sizes)
    started = time.perf_counter()
    compiled = stack_distances(slice_image, slice_sizes)
    compiled_seconds = time.perf_counter() - started
    started = time.perf_counter()
    python = one_pass(slice_image, slice_sizes)  # the same code, not compiled
    python_seconds = time.perf_counter() - started
    assert (python == compiled).all()
    return {"requests": requests, "walls": walls, "slice": 300_000,
            "python_seconds": python_seconds, "compiled_seconds": compiled_seconds}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def record_cost(directory: Path, calls: int = 200_000) -> float:
    """CPU seconds (every thread of this process) per request that the history adds to the
    request path: the handler's record(), with the batched file writes it causes, measured
    directly."""
    import asyncio

    from imgcache.history import AccessHistory, ServerState

    async def measure() -> float:
        history = AccessHistory(directory, calls * 4, lambda: ServerState(GiB, {}))
        await history.open()
        image_id = "8c1b2f5e-0d4a-4c35-9d2e-6a0f3c7b9e12"
        started = time.process_time()
        for _ in range(calls):
            history.record(image_id, 64 * KiB, "hit")
        await history.close()
        return (time.process_time() - started) / calls

    return asyncio.run(measure())


def hitcost(args: argparse.Namespace, procs: Processes, work: Path) -> dict[str, Any]:
    hits, reps = (1000, 3) if args.quick else (3000, 7)
    standin = Standin(procs, work / "hitcost", np.array([64 * KiB]))
    servers = {"history on": Imgcache(procs, work / "hitcost" / "on", standin.url, GiB),
               "history off": Imgcache(procs, work / "hitcost" / "off", standin.url, GiB,
                                       ("--history-max-requests", "0"))}
    per_hit: dict[str, list[float]] = {name: [] for name in servers}
    for server in servers.values():
        server.start()
        replay(server, standin.ids, np.zeros(10, dtype=np.int64))  # 1 miss, 9 hits
    progress(f"hitcost: {reps} x {hits} hits of a 64 KiB image, history on and off")
    for rep in range(reps):
        order = list(servers) if rep % 2 == 0 else list(reversed(servers))
        for name in order:
            server = servers[name]
            pid = server.pid()
            assert pid is not None
            before = _cpu_seconds(pid)
            counts = replay(server, standin.ids, np.zeros(hits, dtype=np.int64))
            assert counts == {"HIT": hits}, counts
            per_hit[name].append((_cpu_seconds(pid) - before) / hits)
    for server in servers.values():
        server.stop()
    procs.stop(standin.proc)
    medians = {name: statistics.median(values) for name, values in per_hit.items()}
    records = [record_cost(work / "hitcost" / f"record-{n}") for n in range(5)]
    return {"hits": hits, "reps": reps, "per_hit": per_hit, "medians": medians,
            "ratio": medians["history on"] / medians["history off"],
            "record_seconds": records,
            "record_share": statistics.median(records) / medians["history off"]}


def plot(result: dict[str, Any], path: Path) -> None:
    """The predicted curve (and the other policies) with the measured points."""
    curve = result["curve"]
    answer = {"caps": curve, "requests": result["requests"], "images": result["images"],
              "method": curve[0]["method"],
              "policies": {name: [row["policies"][name] for row in curve]
                           for name in curve[0]["policies"]}}
    plot_png(answer, path, [(row["cap"], row["measured"]["hit_ratio"],
                             row["measured"]["byte_hit_ratio"]) for row in result["rows"]])


def report(results: dict[str, Any]) -> tuple[str, bool]:
    ok = True
    lines = ["# imgcache sizing: validation, speed, hit-path cost", "",
             f"Machine: {os.cpu_count()} cores, shared with other work while this ran. "
             f"Written by `python -m bench.sizing.run` on {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    if "validate" in results:
        v = results["validate"]
        lines += ["## Predicted vs measured (real imgcache, cold cache per cap)", "",
                  f"{v['requests']:,} requests over {v['images']:,} images "
                  f"({v['catalogue_bytes'] / GiB:.2f} GiB scaled, 200 MiB-20 GiB / 1024), "
                  "Zipf 0.9, the 5 most popular images replaced by new versions halfway.",
                  "", "| cap | measured hit ratio | predicted | error | measured byte hit "
                  "ratio | predicted | error | HIT/MISS/BYPASS |", "|---|---|---|---|---|---|"
                  "---|---|"]
        for row in v["rows"]:
            m, p = row["measured"], row["predicted"]
            errors = (abs(m["hit_ratio"] - p["hit_ratio"]),
                      abs(m["byte_hit_ratio"] - p["byte_hit_ratio"]))
            ok &= max(errors) <= 0.01
            lines.append(f"| {row['cap'] // MiB} MiB | {m['hit_ratio']:.4f} | "
                         f"{p['hit_ratio']:.4f} | {errors[0]:.4f} | {m['byte_hit_ratio']:.4f}"
                         f" | {p['byte_hit_ratio']:.4f} | {errors[1]:.4f} | "
                         f"{m['hit']:.0f}/{m['miss']:.0f}/{m['bypass']:.0f} |")
        lines += ["", "Target: absolute error <= 0.01 at every cap: "
                  + ("met." if ok else "**NOT met**."), "",
                  "Other policies over the same trace (libCacheSim; sizes in KiB), request "
                  "hit ratio / byte hit ratio:", "",
                  "| cap | LRU (libCacheSim) | imgcache's exact LRU | S3-FIFO | SIEVE | GDSF |",
                  "|---|---|---|---|---|---|"]
        for row in v["curve"]:
            if row["cap_bytes"] not in [r["cap"] for r in v["rows"]]:
                continue
            pol = row["policies"]
            lines.append(f"| {row['cap_bytes'] // MiB} MiB | "
                         + " | ".join(f"{x['hit_ratio']:.4f} / {x['byte_hit_ratio']:.4f}"
                                      for x in (pol["LRU"], row, pol["S3-FIFO"],
                                                pol["SIEVE"], pol["GDSF"])) + " |")
        lines += ["", "![predicted vs measured](sizing.png)", "",
                  "`imgcache sizing` on the first of these servers (cap 16 MiB) after its "
                  "replay:", "", "```", v["example"].rstrip(), "```", ""]
    if "speed" in results:
        s = results["speed"]
        median = statistics.median(s["walls"])
        ok &= median <= 10
        per_request_python = s["python_seconds"] / s["slice"]
        per_request_compiled = s["compiled_seconds"] / s["slice"]
        lines += ["## Computing the curve", "",
                  f"`imgcache sizing --cache-dir` over {s['requests']:,} requests "
                  "(20,000 images, 6 caps), whole process (imports, kernel compile, read, "
                  f"passes): median {median:.1f} s of {len(s['walls'])} "
                  f"({', '.join(f'{w:.1f}' for w in s['walls'])}); target <= 10 s: "
                  + ("met." if median <= 10 else "**NOT met**."), "",
                  f"Same run, one pass over {s['slice']:,} requests: compiled kernel "
                  f"{s['compiled_seconds']:.3f} s, the same code run by the Python interpreter "
                  f"{s['python_seconds']:.1f} s ({per_request_python / per_request_compiled:.0f}x);"
                  f" pure Python would need about {per_request_python * s['requests']:.0f} s "
                  f"for {s['requests']:,} requests (per pass; one pass per set of bypassed "
                  "images).", ""]
    if "hitcost" in results:
        h = results["hitcost"]
        ok &= h["record_share"] <= 0.02
        lines += ["## Hit-path cost of the access history", "",
                  f"Server CPU (utime+stime from /proc) per HIT of a 64 KiB image, "
                  f"{h['reps']} alternating rounds of {h['hits']:,} sequential keep-alive "
                  "hits per server:", "",
                  "| server | median CPU per hit | rounds |", "|---|---|---|"]
        for name, values in h["per_hit"].items():
            lines.append(f"| {name} | {h['medians'][name] * 1e6:.0f} us | "
                         + ", ".join(f"{v * 1e6:.0f}" for v in values) + " |")
        record = statistics.median(h["record_seconds"])
        lines += ["", f"Ratio on/off: {h['ratio']:.3f} (end to end; rounds of one server "
                  "differ by more than the history costs, so this only bounds it roughly).",
                  "", f"Measured directly: the history's work per request (learn + record, "
                  f"and the batched writes they cause, CPU of all threads) "
                  f"{record * 1e6:.2f} us (median of {len(h['record_seconds'])}: "
                  + ", ".join(f"{r * 1e6:.2f}" for r in h["record_seconds"])
                  + f"), {h['record_share']:.2%} of the CPU of a hit; target <= 2 %: "
                  + ("met." if h["record_share"] <= 0.02 else "**NOT met**."), ""]
    return "\n".join(lines), ok


def run(args: argparse.Namespace) -> int:
    procs = Processes()
    results: dict[str, Any] = {}
    try:
        with temp_dir(WORK, "sizing-", keep=args.keep) as work:
            if args.only in (None, "validate"):
                results["validate"] = validate(args, procs, work)
            if args.only in (None, "speed"):
                results["speed"] = speed(args, work)
            if args.only in (None, "hitcost"):
                results["hitcost"] = hitcost(args, procs, work)
    finally:
        procs.close()
    text, ok = report(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.only is None else f"-{args.only}"
    (RESULTS / f"sizing{suffix}.md").write_text(text)
    (RESULTS / f"sizing{suffix}.json").write_text(json.dumps(results, indent=1, default=str))
    if "validate" in results:
        plot(results["validate"], RESULTS / "sizing.png")
    print(text)
    return 0 if ok else 1


def main() -> int:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--only", choices=("validate", "speed", "hitcost"))
    parser.add_argument("--quick", action="store_true", help="smaller, for a try-out")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return exit_status(run, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
