"""imgcache.threadpool.SparePool with real threads: the submitter never starts a thread, the
pool grows on its own starter thread to keep spares idle, never past its maximum, and
results, errors and shutdown behave as an Executor's must."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from types import FrameType
from typing import Any

import pytest

from imgcache.threadpool import SparePool


@pytest.fixture
def pool() -> Iterator[SparePool]:
    spare = SparePool(12, started=2, spare=2, name="test-pool")
    spare.start()
    yield spare
    spare.shutdown(wait=True, cancel_futures=True)


def thread_starts_during(call: Callable[[], Any]) -> list[str]:
    """Names of the Thread.start calls made on this thread while ``call`` runs, seen by a
    profile hook (sys.setprofile observes every Python call of the current thread)."""
    seen: list[str] = []

    def profile(frame: FrameType, event: str, _: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name == "start" and code.co_filename.endswith(
                "threading.py"):
            seen.append(frame.f_locals["self"].name)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return seen


def occupy(pool: Executor, count: int, release: threading.Event) -> list[Any]:
    """Submit ``count`` calls that each hold a thread until ``release`` is set."""
    running = threading.Semaphore(0)

    def hold() -> str:
        running.release()
        release.wait(10)
        return threading.current_thread().name

    futures = [pool.submit(hold) for _ in range(count)]
    for _ in range(count):
        assert running.acquire(timeout=10), "a call never got a thread"
    return futures


def test_submitting_never_starts_a_thread_the_stdlib_pool_does(pool: SparePool) -> None:
    release = threading.Event()
    stdlib = ThreadPoolExecutor(8)
    try:
        assert thread_starts_during(lambda: occupy(stdlib, 6, release)), \
            "the control: ThreadPoolExecutor starts threads inside submit"
        futures: list[Any] = []
        starts = thread_starts_during(lambda: futures.extend(occupy(pool, 10, release)))
        assert starts == []
        release.set()
        names = {future.result(timeout=10) for future in futures}
        assert len(names) == 10 and all(name.startswith("test-pool_") for name in names)
    finally:
        release.set()
        stdlib.shutdown(wait=True)


def test_the_pool_keeps_spares_idle_and_stops_at_its_maximum(pool: SparePool) -> None:
    release = threading.Event()
    futures = occupy(pool, 6, release)
    deadline = time.monotonic() + 10
    while pool_threads() < 8 and time.monotonic() < deadline:  # 6 busy + 2 spare
        time.sleep(0.01)
    assert pool_threads() == 8
    # Beyond the maximum (12), a call waits for a thread to come free.
    futures += occupy(pool, 6, release)
    late = pool.submit(lambda: "late")
    time.sleep(0.2)
    assert not late.done() and pool_threads() == 12
    release.set()
    assert late.result(timeout=10) == "late"
    wait(futures, timeout=10)


def pool_threads() -> int:
    return sum(t.name.startswith("test-pool_") for t in threading.enumerate())


def test_errors_reach_the_caller_and_shutdown_cancels_what_waits() -> None:
    pool = SparePool(1, started=1, spare=1, name="test-one")
    pool.start()
    boom = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        boom.result(timeout=10)
    release = threading.Event()
    (busy,) = occupy(pool, 1, release)
    queued = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None)
    release.set()
    assert busy.result(timeout=10) == "test-one_0"


def test_every_thread_ends_after_shutdown_even_one_started_late() -> None:
    pool = SparePool(16, started=2, spare=2, name="test-end")
    pool.start()
    release = threading.Event()
    futures = occupy(pool, 10, release)  # the starter grows the pool meanwhile
    pool.shutdown(wait=False)
    release.set()
    wait(futures, timeout=10)
    pool.shutdown(wait=True)
    assert [t.name for t in threading.enumerate() if t.name.startswith("test-end")] == []
