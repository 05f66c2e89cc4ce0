"""Worker threads whose calls the event loop awaits with one hand-off each way.

``loop.run_in_executor`` wraps every call in a concurrent.futures.Future (a Condition and
its lock), chains an asyncio future to it and, in ``threads.run_to_completion``, shields
that: about twice the loop's CPU of a call that hands its result straight to an asyncio
future (``bench/scaling/handoff.py``). The senders make one or more such calls per hit,
so they use this group: a fixed set of threads, all started before serving, taking calls
from one queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from imgcache.threadnames import show_thread_name

T = TypeVar("T")

#: Seconds ``start`` waits for every thread to have run its initializer.
START_SECONDS = 30.0


class _Call(Generic[T]):
    """One call's outcome, settled on the loop by ``settle``."""

    __slots__ = ("finished", "result", "settled")

    def __init__(self, result: asyncio.Future[T]) -> None:
        self.result = result
        self.settled = False
        self.finished: asyncio.Future[None] | None = None  # made when a caller waits on

    def settle(self, value: T, error: BaseException | None) -> None:
        """Runs on the loop once the thread returned: hand over what it returned (unless
        the caller was cancelled) and wake a cancelled caller waiting for the thread."""
        self.settled = True
        if not self.result.done():
            if error is None:
                self.result.set_result(value)
            else:
                self.result.set_exception(error)
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


_Work = tuple[asyncio.AbstractEventLoop, _Call[Any], Callable[..., Any], tuple[Any, ...]]


class LoopThreads:
    """``count`` threads named ``name``_N (``name`` for the OS) that run calls awaited by
    ``run``; ``initializer`` runs first on each. ``start`` (off the loop) starts them all;
    ``shutdown`` ends them once the calls queued before it are done, and refuses calls
    after it."""

    def __init__(self, count: int, name: str,
                 initializer: Callable[[], None] | None = None) -> None:
        if count < 1:
            raise ValueError(f"a group of threads needs at least one, not {count}")
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._shut = False
        self._started = False
        self._initialized = threading.Barrier(count + 1, timeout=START_SECONDS)
        self._init_errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._serve, args=(initializer,),
                                          name=f"{name}_{n}", daemon=True)
                         for n in range(count)]

    def start(self) -> None:
        """Start every thread and wait until each ran the initializer (call it off the
        event loop; once). Raises RuntimeError, with the group shut down, if a thread could
        not start, its initializer raised, or they were not all ready within
        START_SECONDS: a group short of threads would leave calls waiting for ever once
        none was left."""
        if self._started:
            raise RuntimeError(f"the {self._name} threads were started already")
        self._started = True
        try:
            for thread in self._threads:
                thread.start()
            self._initialized.wait()
            timed_out = False
        except threading.BrokenBarrierError:
            timed_out = True
        except BaseException:
            self._initialized.abort()  # the threads that started end at once
            self.shutdown()
            raise
        if self._init_errors:
            self.shutdown()
            error = self._init_errors[0]
            raise RuntimeError(f"{len(self._init_errors)} of the {len(self._threads)} "
                               f"{self._name} threads failed to start: {error!r}") from error
        if timed_out:
            self.shutdown()
            raise RuntimeError(f"the {self._name} threads were not all ready within "
                               f"{START_SECONDS:g} s")

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Run ``func(*args)`` on one of the threads. If the caller is cancelled meanwhile
        (a shutdown), it still waits for the thread to finish before the cancellation goes
        on: the thread may be using fds the caller closes as soon as it returns, and so do
        further cancellations meanwhile. Raises RuntimeError after ``shutdown``."""
        if self._shut:
            raise RuntimeError("cannot run a call after shutdown")
        loop = asyncio.get_running_loop()
        call: _Call[T] = _Call(loop.create_future())
        self._work.put((loop, call, func, args))
        try:
            return await call.result
        except asyncio.CancelledError:
            if not call.settled:
                finished = call.finished = loop.create_future()
                while not finished.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(finished)
            raise

    def shutdown(self) -> None:
        """End the threads after the calls already queued (does not wait for them); later
        calls are refused."""
        self._shut = True
        for _ in self._threads:
            self._work.put(None)

    def _serve(self, initializer: Callable[[], None] | None) -> None:
        try:
            show_thread_name(self._name)
            if initializer is not None:
                initializer()
        except BaseException as exc:  # raised by start, which waits for every thread
            self._init_errors.append(exc)
            self._wait_for_the_others()
            return
        if not self._wait_for_the_others():
            return
        while (work := self._work.get()) is not None:
            loop, call, func, args = work
            value, error = None, None
            try:
                value = func(*args)
            except BaseException as exc:  # handed to the caller, as an executor does
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(call.settle, value, error)
            del work, call, value, error  # no reference kept while waiting for the next

    def _wait_for_the_others(self) -> bool:
        """Wait until every thread ran its initializer; False if starting them failed."""
        try:
            self._initialized.wait()
        except threading.BrokenBarrierError:
            return False
        return True
