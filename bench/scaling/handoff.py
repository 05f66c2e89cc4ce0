"""What one hand-off to a worker thread and back costs the event loop: the senders' former
``threads.run_to_completion`` over a ThreadPoolExecutor (``run_in_executor`` plus a
shield) against ``imgcache.loopthreads.LoopThreads``. Each repetition awaits ``--calls``
calls of a function that returns at once, through both in turn (alternating which goes
first), on uvloop; the loop thread's CPU time (getrusage RUSAGE_THREAD) and the wall time
per call, in microseconds, and the ratio of the two medians.

    .venv/bin/python -m bench.scaling.handoff [--calls 20000] [--reps 5]
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import uvloop

from bench.common.lifecycle import argument_parser
from imgcache.loopthreads import LoopThreads
from imgcache.threads import run_to_completion

THREADS = 4


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _nothing() -> None:
    return None


async def per_call(call: Callable[[], Awaitable[None]], calls: int) -> tuple[float, float]:
    """Loop-thread CPU and wall microseconds per awaited ``call()``."""
    cpu, wall = _thread_cpu(), time.perf_counter()
    for _ in range(calls):
        await call()
    return ((_thread_cpu() - cpu) / calls * 1e6, (time.perf_counter() - wall) / calls * 1e6)


async def compare(calls: int, reps: int) -> None:
    """Print one line per way and repetition, then the medians' ratio."""
    pool = ThreadPoolExecutor(THREADS)
    for _ in range(THREADS):
        pool.submit(_nothing).result()
    group = LoopThreads(THREADS, "bench-handoff")
    await asyncio.to_thread(group.start)
    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "ThreadPoolExecutor + run_to_completion": lambda: run_to_completion(pool, _nothing),
        "LoopThreads.run": lambda: group.run(_nothing),
    }
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for rep in range(reps):
            order = list(ways) if rep % 2 == 0 else list(reversed(ways))
            for name in order:
                used, wall = await per_call(ways[name], calls)
                cpu[name].append(used)
                print(f"rep {rep + 1} {name}: loop CPU {used:.1f} us, wall {wall:.1f} us "
                      "per call", flush=True)
    finally:
        pool.shutdown()
        group.shutdown()
    old, new = (statistics.median(cpu[name]) for name in ways)
    print(f"median loop CPU per call: {old:.1f} us against {new:.1f} us ({new / old:.2f}x)")


def main() -> None:
    """Parse the options and run the comparison on uvloop."""
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(compare(args.calls, args.reps))


if __name__ == "__main__":
    main()
