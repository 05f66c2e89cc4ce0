"""imgcache.loopthreads.LoopThreads with real threads on uvloop: results and errors reach
the awaiting caller, a cancelled caller waits for its thread, calls run on the group's own
threads (initializer first) and shutdown ends them after the calls queued before it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imgcache import app, loopthreads
from imgcache.config import load_settings
from imgcache.loopthreads import LoopThreads


@pytest.fixture
async def group() -> AsyncIterator[LoopThreads]:
    threads = LoopThreads(2, "test-lane")
    await asyncio.to_thread(threads.start)
    yield threads
    threads.shutdown()


async def test_a_result_and_an_error_reach_the_caller(group: LoopThreads) -> None:
    assert await group.run(pow, 2, 10) == 1024
    with pytest.raises(ZeroDivisionError):
        await group.run(divmod, 1, 0)


async def test_calls_run_on_the_groups_threads_after_the_initializer() -> None:
    initialized: list[str] = []

    def initializer() -> None:
        time.sleep(0.1)
        initialized.append(threading.current_thread().name)

    threads = LoopThreads(3, "test-init", initializer=initializer)
    await asyncio.to_thread(threads.start)
    assert len(initialized) == 3  # start waited for every initializer
    try:
        ran_on = {await threads.run(lambda: threading.current_thread().name)
                  for _ in range(20)}
    finally:
        threads.shutdown()
    assert sorted(initialized) == ["test-init_0", "test-init_1", "test-init_2"]
    assert ran_on <= set(initialized) and threading.current_thread().name not in ran_on


async def test_a_thread_whose_initializer_fails_fails_the_start_and_ends_the_group() -> None:
    ours: list[threading.Thread] = []

    def initializer() -> None:
        ours.append(threading.current_thread())
        if threading.current_thread().name == "test-fail_1":
            raise OSError(1, "Operation not permitted")

    threads = LoopThreads(3, "test-fail", initializer=initializer)
    with pytest.raises(RuntimeError, match=r"1 of the 3 test-fail threads failed to start: "
                                           r"PermissionError.*not permitted"):
        await asyncio.to_thread(threads.start)
    assert len(ours) == 3
    for thread in ours:
        await asyncio.to_thread(thread.join, 5)
    assert not any(thread.is_alive() for thread in ours)
    with pytest.raises(RuntimeError, match="after shutdown"):
        await threads.run(pow, 2, 10)


async def test_a_group_whose_threads_are_not_all_ready_in_time_is_shut_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loopthreads, "START_SECONDS", 0.2)
    release = threading.Event()
    ours: list[threading.Thread] = []

    def initializer() -> None:
        ours.append(threading.current_thread())
        if threading.current_thread().name == "test-slow_0":
            release.wait(10)

    threads = LoopThreads(2, "test-slow", initializer=initializer)
    try:
        with pytest.raises(RuntimeError, match=r"test-slow threads were not all ready within "
                                               r"0\.2 s"):
            await asyncio.to_thread(threads.start)
        with pytest.raises(RuntimeError, match="after shutdown"):
            await threads.run(pow, 2, 10)
    finally:
        release.set()
    async with asyncio.timeout(10):
        while len(ours) < 2:  # the second thread may not have run its first line yet
            await asyncio.sleep(0.01)
    for thread in ours:
        await asyncio.to_thread(thread.join, 5)
    assert not any(thread.is_alive() for thread in ours)


async def test_an_initializer_error_is_told_even_when_another_thread_is_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loopthreads, "START_SECONDS", 0.2)
    release = threading.Event()

    def initializer() -> None:
        if threading.current_thread().name == "test-both_0":
            raise OSError(1, "Operation not permitted")
        release.wait(10)

    threads = LoopThreads(2, "test-both", initializer=initializer)
    try:
        with pytest.raises(RuntimeError, match="failed to start: PermissionError") as caught:
            await asyncio.to_thread(threads.start)
        assert isinstance(caught.value.__cause__, PermissionError)
    finally:
        release.set()


async def test_a_group_starts_once_and_has_a_thread_at_least(group: LoopThreads) -> None:
    with pytest.raises(RuntimeError, match="started already"):
        await asyncio.to_thread(group.start)
    assert await group.run(pow, 2, 10) == 1024  # the group is still whole
    with pytest.raises(ValueError, match="at least one"):
        LoopThreads(0, "test-none")


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_cancelled_caller_goes_on_only_once_the_thread_is_done(
    group: LoopThreads, cancels: int
) -> None:
    # A second cancel (a timeout around a shutdown's cancel, say) must not let the caller go
    # on either, and close the fds its thread still uses.
    entered = threading.Event()
    events: list[str] = []

    def slow() -> None:
        entered.set()
        time.sleep(0.3)
        events.append("thread done")

    task = asyncio.ensure_future(group.run(slow))
    await asyncio.to_thread(entered.wait)
    for _ in range(cancels):
        task.cancel()
        await asyncio.sleep(0.05)  # the caller now waits for the thread
    with pytest.raises(asyncio.CancelledError):
        await task
    events.append("caller went on")
    assert events == ["thread done", "caller went on"]
    assert await group.run(lambda: "still serving") == "still serving"


async def test_shutdown_ends_the_threads_after_the_calls_queued_before_it() -> None:
    threads = LoopThreads(1, "test-stop")
    await asyncio.to_thread(threads.start)
    release = threading.Event()
    first = asyncio.ensure_future(threads.run(release.wait))
    second = asyncio.ensure_future(threads.run(lambda: "queued before"))
    await asyncio.sleep(0)  # both queued
    alive = [t for t in threading.enumerate() if t.name == "test-stop_0"]
    assert len(alive) == 1  # else the check below would pass on no thread at all
    threads.shutdown()
    release.set()
    assert await first is True
    assert await second == "queued before"
    await asyncio.to_thread(lambda: [t.join(5) for t in alive])
    assert not any(t.is_alive() for t in alive)


@pytest.mark.timeout(30)  # a dead thread leaves the next call waiting for it forever
def test_a_call_whose_loop_closed_does_not_end_its_thread() -> None:
    threads = LoopThreads(1, "test-closed")
    threads.start()
    release = threading.Event()
    try:
        loop = asyncio.new_event_loop()
        pending = loop.create_task(threads.run(release.wait))
        loop.run_until_complete(asyncio.sleep(0.05))  # queued; its thread now waits
        pending.cancel()
        loop.close()  # the call's result will have no loop to go to
        release.set()
        assert asyncio.run(asyncio.wait_for(threads.run(lambda: "next loop"), 5)) == "next loop"
    finally:
        threads.shutdown()


def test_a_call_after_shutdown_is_refused_not_left_waiting() -> None:
    # On a loop of its own: a call left waiting could not be cancelled (its cancelled caller
    # waits for a thread that will never take it), so the test's loop could not end.
    threads = LoopThreads(1, "test-after")
    threads.start()
    threads.shutdown()
    loop = asyncio.new_event_loop()
    try:
        call = loop.create_task(threads.run(pow, 2, 10))
        loop.run_until_complete(asyncio.wait([call], timeout=2.0))
        assert call.done(), "a call made after shutdown waits forever"
        with pytest.raises(RuntimeError):
            call.result()
    finally:
        loop.close()


@pytest.mark.parametrize("fault", ["sender initializer", "cache dir is a file"])
async def test_a_failed_start_up_leaves_no_thread_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str,
) -> None:
    cache_dir = tmp_path / "cache"
    if fault == "sender initializer":
        # A fault no real thread start can be made to produce here: the initializer raises.
        def refuse() -> None:
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(app, "_yield_to_the_loop", refuse)
        expected: tuple[type[BaseException], str] = (
            RuntimeError, "imgcache-send threads failed to start")
    else:  # found by store.open, after every thread group started
        await asyncio.to_thread(cache_dir.write_bytes, b"not a directory")
        expected = (NotADirectoryError, "cache")
    settings = load_settings({"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                              "upstream": "http://127.0.0.1:9", "cache_dir": str(cache_dir),
                              "admin_socket": str(tmp_path / "admin.sock")}, environ={})
    before = set(threading.enumerate())
    with pytest.raises(expected[0], match=expected[1]):
        async with app.running(settings):
            pass
    async with asyncio.timeout(10):  # TimeoutError: imgcache's threads stayed
        while [t for t in set(threading.enumerate()) - before
               if t.name.startswith("imgcache-")]:
            await asyncio.sleep(0.05)
