"""How long a ``submit`` holds its caller (the event loop, for the fill pipeline's pool) when
every thread of the pool is busy: ``concurrent.futures.ThreadPoolExecutor`` starts a thread
inside ``submit``, ``imgcache.threadpool.SparePool`` leaves that to its starter thread. Each
repetition submits ``--calls`` calls that hold their thread, 2 ms apart, to both pools in
turn; medians, 90th percentiles and maxima of the submit times, in milliseconds.

    .venv/bin/python -m bench.scaling.pool_submit [--calls 64] [--reps 3]
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor

from bench.common.lifecycle import argument_parser
from imgcache.app import PIPELINE_THREADS, PIPELINE_THREADS_SPARE, PIPELINE_THREADS_STARTED
from imgcache.threadpool import SparePool


def submit_times(pool: Executor, calls: int) -> list[float]:
    """Seconds each of ``calls`` submits took, every call holding its thread until the end."""
    release = threading.Event()
    times = []
    try:
        for _ in range(calls):
            start = time.perf_counter()
            pool.submit(release.wait)
            times.append(time.perf_counter() - start)
            time.sleep(0.002)
    finally:
        release.set()
        pool.shutdown(wait=True)
    return sorted(times)


def main() -> None:
    """Run the comparison and print one line per pool and repetition."""
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    for rep in range(args.reps):
        spare = SparePool(PIPELINE_THREADS, started=PIPELINE_THREADS_STARTED,
                          spare=PIPELINE_THREADS_SPARE, name="bench-pipe")
        spare.start()
        for name, pool in (("ThreadPoolExecutor", ThreadPoolExecutor(PIPELINE_THREADS)),
                           ("SparePool", spare)):
            times = submit_times(pool, args.calls)
            print(f"rep {rep + 1} {name}: submit median {statistics.median(times) * 1e3:.3f} "
                  f"ms, p90 {times[int(len(times) * 0.9)] * 1e3:.3f} ms, "
                  f"max {times[-1] * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
