"""How fast a restarted imgcache answers with a large cache: the time from spawning
`imgcache serve` to its first answer (/healthz 200), with 10,000 cached entries against an
empty cache, each the median of N starts in the same run.

    .venv/bin/python -m bench.scaling.startup [--entries 10000] [--reps 5]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from processes import free_port, make_cache, stop_process

from bench.common.lifecycle import argument_parser

IMGCACHE = str(Path(sys.executable).with_name("imgcache"))


def time_to_answer(cache_dir: Path, socket_path: Path) -> float:
    """Seconds from spawning the server to its first 200 on /healthz."""
    metrics_port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen(
        [IMGCACHE, "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-listen", f"127.0.0.1:{metrics_port}", "--cache-dir", str(cache_dir),
         "--admin-socket", str(socket_path), "--log-level", "warning"],
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz",
                                            timeout=1):
                    return time.monotonic() - started
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("imgcache exited while starting") from None
                time.sleep(0.005)
    finally:
        stop_process(proc)


def main() -> None:
    """Measure and print a markdown table."""
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgcache-startup-"))
    try:
        make_cache(work / "full", args.entries)
        (work / "empty").mkdir()
        times: dict[str, list[float]] = {"empty": [], "full": []}
        for _ in range(args.reps):
            for name in ("empty", "full"):
                times[name].append(time_to_answer(work / name, work / f"{name}.sock"))
        empty, full = (statistics.median(times[n]) for n in ("empty", "full"))
        print(f"| cache | median time to first answer (s), {args.reps} starts |")
        print("|---|---|")
        print(f"| empty | {empty:.2f} |")
        print(f"| {args.entries:,} entries | {full:.2f} |")
        print(f"\n{args.entries:,} entries add {full - empty:.2f} s to a start "
              f"({full / empty:.2f}x the empty start).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
