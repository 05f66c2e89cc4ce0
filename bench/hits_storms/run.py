"""imgcache's core benchmark: ``.venv/bin/python -m bench.hits_storms.run [--quick]`` (also
``make bench``; see bench/README.md).

Starts nginx (Glance stand-in and static-file baseline) and imgcache on 127.0.0.1, drives
them with curl processes, prints a markdown report and writes it to bench/results/latest.md.
Every process and temp dir it creates is removed when it ends, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import uuid
from pathlib import Path

from bench.common import lifecycle
from bench.common.checks import Checks
from bench.common.glance_nginx import Nginx, Route, find_or_install_nginx
from bench.common.images import ensure_image, human_size, parse_size
from bench.common.imgcache_server import Imgcache
from bench.common.lifecycle import progress
from bench.common.paths import REPO, RESULTS, WORK
from bench.common.procs import Processes
from bench.common.report_parts import machine_details
from bench.hits_storms.measure import Bench, measure_cold, measure_hits, prime_hit
from bench.hits_storms.report import render


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick lowers the defaults (3 repetitions, 256 MiB images)."""
    parser = lifecycle.argument_parser(__spec__.name, __doc__)
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
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.md",
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
    lifecycle.check_curl()
    lifecycle.sweep_stale_runs()
    hit, storms, singles, direct = new_routes(args)
    do_hits, do_cold = args.only in (None, "hits"), args.only in (None, "cold")
    cache_need = (args.size if do_hits else 0) + (2 * args.storm_size * args.reps
                                                  if do_cold else 0)
    lifecycle.check_disk(cache_need + (256 << 20))
    checks = Checks()
    procs = Processes()
    with contextlib.ExitStack() as stack:
        # Exit callbacks run last-registered first: processes stop before dirs go.
        run_dir, scratch = lifecycle.enter_run(stack, args.keep_work, args.verify * args.storm_size)
        stack.callback(procs.close)
        stack.callback(lifecycle.ignore_interrupts)
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
            lifecycle.show_log(imgcache.log)
            raise
        command = "python -m bench.hits_storms.run " + shlex.join(sys.argv[1:])
        text = render(hits, cold, checks, machine_details(nginx_binary, REPO), args.reps,
                      command.strip())
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    progress(f"report written to {args.output}")
    return 1 if checks.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the benchmark; exit 1 on a failed check, 130 on interruption."""
    return lifecycle.exit_status(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
