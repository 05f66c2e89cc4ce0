"""How long ``imgcache clear`` holds the server's event loop: with N and 2N cached entries,
the longest a /healthz request waited while the clear ran (sampled every 10 ms from a
thread), and the clear's own wall time. Linear work doubles from N to 2N; quadratic work
(re-summing every entry per removal) quadruples.

    .venv/bin/python -m bench.scaling.clear [--entries 10000] [--reps 3]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from processes import free_port, make_cache, stop_process

from bench.common.lifecycle import argument_parser

IMGCACHE = str(Path(sys.executable).with_name("imgcache"))


def _wait_answering(url: str, proc: subprocess.Popen[bytes]) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("imgcache exited while starting") from None
            time.sleep(0.01)


def clear_once(work: Path, entries: int) -> tuple[float, float]:
    """Start a server on a cache of ``entries`` entries and clear it: (the longest /healthz
    wait during the clear, the clear's wall time), in seconds."""
    cache = work / f"cache-{entries}"
    shutil.rmtree(cache, ignore_errors=True)
    make_cache(cache, entries)
    metrics_port, sock = free_port(), work / "admin.sock"
    proc = subprocess.Popen(
        [IMGCACHE, "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-listen", f"127.0.0.1:{metrics_port}", "--cache-dir", str(cache),
         "--admin-socket", str(sock), "--log-level", "warning", "--max-size", "1T"],
        stderr=subprocess.DEVNULL, start_new_session=True)
    health = f"http://127.0.0.1:{metrics_port}/healthz"
    try:
        _wait_answering(health, proc)
        waits: list[float] = []
        done = threading.Event()

        def probe() -> None:
            while not done.is_set():
                started = time.monotonic()
                with urllib.request.urlopen(health, timeout=60):
                    waits.append(time.monotonic() - started)
                time.sleep(0.01)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(0.2)
        began = time.monotonic()
        subprocess.run([IMGCACHE, "clear", "--socket", str(sock)], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
        wall = time.monotonic() - began
        time.sleep(0.2)
        done.set()
        prober.join()
        return max(waits), wall
    finally:
        stop_process(proc)


def main() -> None:
    """Measure and print a markdown table."""
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgcache-clear-"))
    try:
        sizes = (args.entries, 2 * args.entries)
        stalls: dict[int, list[float]] = {n: [] for n in sizes}
        walls: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(args.reps):
            for entries in sizes:
                stall, wall = clear_once(work, entries)
                stalls[entries].append(stall)
                walls[entries].append(wall)
        print(f"| entries | longest /healthz wait during the clear (median of {args.reps}) "
              "| clear wall time |")
        print("|---|---|---|")
        for entries in sizes:
            print(f"| {entries:,} | {statistics.median(stalls[entries]):.3f} s "
                  f"| {statistics.median(walls[entries]):.3f} s |")
        small, large = (statistics.median(stalls[n]) for n in sizes)
        print(f"\n2x the entries: {large / small:.2f}x the longest wait "
              "(linear: about 2x; quadratic: about 4x).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
