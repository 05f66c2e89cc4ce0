"""imgcache benchmarks: ``.venv/bin/python bench/run.py [--quick]`` (see bench/README.md);
``--suite peers`` runs the comparison with nginx proxy_cache and Varnish (``peers.py``).

Starts nginx (Glance stand-in and static-file baseline) and imgcache on 127.0.0.1, drives
them with curl processes, prints a markdown report and writes it to bench/results/latest.md.
Every process and temp dir it creates is removed when it ends, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import sys
import uuid
from pathlib import Path

from glance_nginx import Nginx, Route, find_or_install_nginx
from images import ensure_image, human_size, parse_size
from imgcache_server import Imgcache
from lifecycle import exit_status, ignore_interrupts, restore_interrupts, show_log, temp_dir
from measure import Bench, Checks, measure_cold, measure_hits, prime_hit, progress
from procs import Processes, pid_alive, run_text
from report import machine_details, render

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / "work"
RESULTS = BENCH_DIR / "results" / "latest.md"
#: curl's ``%header{}`` write-out variable appeared in 7.84.
MIN_CURL = (7, 84)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick lowers the defaults (3 repetitions, 256 MiB images)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("core", "peers"), default="core",
                        help="core: this benchmark; peers: imgcache against nginx "
                        "proxy_cache, Varnish and direct downloads (bench/peers.py; "
                        "its options follow, see --suite peers --help)")
    parser.add_argument("--quick", action="store_true",
                        help="3 repetitions and 256M images (unless given explicitly)")
    parser.add_argument("--reps", type=int, help="repetitions per measurement (5; quick 3)")
    parser.add_argument("--size", type=parse_size, help="hit image size (1G; quick 256M)")
    parser.add_argument("--storm-size", type=parse_size,
                        help="image size of the cold measurements (1G; quick 256M)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent hit clients (8)")
    parser.add_argument("--storm-clients", type=int, default=16,
                        help="clients per cold storm (16)")
    parser.add_argument("--verify", type=int, default=2,
                        help="storm clients per repetition whose body is sha512-checked (2)")
    parser.add_argument("--only", choices=("hits", "cold"), help="run one measurement only")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="where the report is written (bench/results/latest.md)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the run's work dir (logs, nginx config) for debugging")
    args = parser.parse_args(argv)
    small = parse_size("256M")
    args.reps = args.reps or (3 if args.quick else 5)
    args.size = args.size or (small if args.quick else parse_size("1G"))
    args.storm_size = args.storm_size or (small if args.quick else parse_size("1G"))
    if args.reps < 1 or args.clients < 1 or args.storm_clients < 1 or args.verify < 0:
        parser.error("--reps, --clients and --storm-clients must be >= 1, --verify >= 0")
    return args


def check_curl() -> None:
    """Fail early unless a curl new enough for the ``-w`` variables used is installed."""
    version = run_text(["curl", "--version"])
    match = re.match(r"curl (\d+)\.(\d+)", version)
    if not match:
        raise RuntimeError("curl is not installed (apt-get install -y curl)")
    if (int(match.group(1)), int(match.group(2))) < MIN_CURL:
        raise RuntimeError(f"curl >= {'.'.join(map(str, MIN_CURL))} needed, found "
                           f"{version.split()[1]}")


def sweep_stale_runs() -> None:
    """Remove run dirs of earlier runs whose process is gone (killed with -9, say)."""
    for old in WORK.glob("run-*"):
        match = re.match(r"run-(\d+)-", old.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)


def scratch_parent(run_dir: Path, need: int) -> Path:
    """Where checked storm bodies go: /dev/shm when it has room (no disk writes competing
    with imgcache's fill), else the run dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need + (256 << 20):
        return shm
    return run_dir


def check_disk(need: int) -> None:
    """Fail early when bench/work cannot hold imgcache's cache for this run."""
    free = shutil.disk_usage(WORK).free
    if free < need:
        raise RuntimeError(f"{WORK} has {human_size(free)} free; this run needs about "
                           f"{human_size(need)} (imgcache's cache); try --quick")


def new_routes(args: argparse.Namespace) -> tuple[Route, list[Route], list[Route], Route]:
    """The hit image's route; per repetition a fresh id for the storm and one for the lone
    cold MISS; the id of direct downloads (all but the first expose the same file)."""
    images = WORK / "images"
    progress(f"images: {human_size(args.size)} and {human_size(args.storm_size)} "
             f"(generated once, kept in {images})")
    hit_image = ensure_image(args.size, images)
    storm_image = ensure_image(args.storm_size, images)
    hit = Route(str(uuid.uuid4()), hit_image)
    storms = [Route(str(uuid.uuid4()), storm_image) for _ in range(args.reps)]
    singles = [Route(str(uuid.uuid4()), storm_image) for _ in range(args.reps)]
    return hit, storms, singles, Route(str(uuid.uuid4()), storm_image)


def run(args: argparse.Namespace) -> int:
    """Set up, measure, report; returns the exit status (1 when a check failed)."""
    nginx_binary = find_or_install_nginx()
    check_curl()
    WORK.mkdir(parents=True, exist_ok=True)
    sweep_stale_runs()
    hit, storms, singles, direct = new_routes(args)
    do_hits, do_cold = args.only in (None, "hits"), args.only in (None, "cold")
    cache_need = (args.size if do_hits else 0) + (2 * args.storm_size * args.reps
                                                  if do_cold else 0)
    check_disk(cache_need + (256 << 20))
    checks = Checks()
    procs = Processes()
    with contextlib.ExitStack() as stack:
        # Exit callbacks run last-registered first: processes stop before dirs go.
        stack.callback(restore_interrupts)
        run_dir = stack.enter_context(temp_dir(WORK, f"run-{os.getpid()}-", args.keep_work))
        need = args.verify * args.storm_size
        scratch = stack.enter_context(
            temp_dir(scratch_parent(run_dir, need), "imgcache-bench-"))
        stack.callback(procs.close)
        stack.callback(ignore_interrupts)
        nginx = Nginx(nginx_binary, run_dir / "nginx", [hit, *storms, *singles, direct],
                      [hit], procs)
        nginx.start()
        imgcache = Imgcache(procs, run_dir, nginx.glance_url,
                            max_size=cache_need + (64 << 20))
        imgcache.start()
        progress(f"nginx (glance {nginx.glance_url}, local {nginx.local_url}), "
                 f"imgcache {imgcache.url} pid {imgcache.pid()}, work dir {run_dir}")
        bench = Bench(procs, nginx, imgcache, scratch, checks)
        try:
            hits = cold = None
            if do_hits:
                prime_hit(bench, hit)
                hits = measure_hits(bench, hit, args.reps, args.clients)
            if do_cold:
                cold = measure_cold(bench, storms, singles, direct, args.storm_clients,
                                    args.verify)
        except Exception:
            show_log(imgcache.log)
            raise
        command = "python bench/run.py " + shlex.join(sys.argv[1:])
        text = render(hits, cold, checks, machine_details(nginx_binary, REPO), args.reps,
                      command.strip())
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    progress(f"report written to {args.output}")
    return 1 if checks.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the benchmark; exit 1 on a failed check, 130 on interruption."""
    suite = argparse.ArgumentParser(add_help=False)
    suite.add_argument("--suite", choices=("core", "peers"), default="core")
    chosen, rest = suite.parse_known_args(sys.argv[1:] if argv is None else argv)
    if chosen.suite == "peers":
        import peers

        return peers.main(rest)
    return exit_status(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
