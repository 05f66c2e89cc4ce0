"""A thread pool whose threads are never started by the caller of ``submit``.

``concurrent.futures.ThreadPoolExecutor`` starts a new thread inside ``submit`` whenever no
idle one is left, and ``Thread.start`` waits until the new thread first runs: called from
the event loop (``loop.run_in_executor``), that holds the loop for as long as the scheduler
takes to run the thread, milliseconds on a busy machine, in the middle of a storm. Here the
pool starts ``started`` threads before serving (``start``, off the loop), and a starter
thread of its own keeps at least ``spare`` of them idle, up to ``max_workers``: ``submit``
only queues the call and, when the spares run low, wakes the starter. A call submitted
while every thread is busy waits in the queue until the starter's new thread takes it.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from imgcache.threadnames import show_thread_name

T = TypeVar("T")
_WorkItem = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class SparePool(Executor):
    """At most ``max_workers`` threads named ``name``_N (``name`` for the OS, until a call
    names its thread after its role); ``started`` of them start in
    ``start``, more on the pool's own starter thread so that ``spare`` stay idle.

    ``submit`` takes no lock (a lock another thread holds would block the event loop): it
    counts the calls it queued, the threads count those they finished under a lock of their
    own, and the difference is what keeps threads busy."""

    def __init__(self, max_workers: int, *, started: int, spare: int, name: str) -> None:
        if not 0 < spare <= started <= max_workers:
            raise ValueError("SparePool needs 0 < spare <= started <= max_workers")
        self._max = max_workers
        self._initial = started
        self._spare = spare
        self._name = name
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []  # appended to by one thread at a time
        self._submitted = itertools.count(1)  # next() is atomic: the calls queued so far
        self._queued = 0
        self._finished = 0  # calls done, written under _finished_lock by the threads
        self._finished_lock = threading.Lock()
        self._wake_starter: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._closed = False
        self._starter: threading.Thread | None = None

    def start(self) -> None:
        """Start the first threads and the starter; blocks until they run (call it off the
        event loop, before serving)."""
        for _ in range(self._initial):
            self._start_worker()
        self._starter = threading.Thread(target=self._keep_spares, name=f"{self._name}-starter",
                                         daemon=True)
        self._starter.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; never starts a thread, never waits for a lock."""
        if self._closed:
            raise RuntimeError("cannot submit to a pool that was shut down")
        future: Future[T] = Future()
        self._queued = max(self._queued, next(self._submitted))
        self._work.put((future, fn, args, kwargs))
        if self._idle() < self._spare and len(self._threads) < self._max:
            self._wake_starter.put(True)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; the threads end once the queue before them is done
        (``cancel_futures``: calls not started yet are cancelled)."""
        self._closed = True
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._work.get_nowait()
                    if item is not None:
                        item[0].cancel()
        self._wake_starter.put(False)
        self._work.put(None)  # each thread that takes it puts it back and ends
        if wait:
            if self._starter is not None:
                self._starter.join()  # it starts no thread after this
            for thread in list(self._threads):
                thread.join()

    def _idle(self) -> int:
        """Threads with nothing to do (negative: calls waiting for a thread)."""
        return len(self._threads) - (self._queued - self._finished)

    def _keep_spares(self) -> None:
        while self._wake_starter.get():
            while (not self._closed and self._idle() < self._spare
                   and len(self._threads) < self._max):
                self._start_worker()

    def _start_worker(self) -> None:
        thread = threading.Thread(target=self._work_forever,
                                  name=f"{self._name}_{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work_forever(self) -> None:
        show_thread_name(self._name)
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future  # drop references to the call's objects before waiting again
            with self._finished_lock:
                self._finished += 1
        self._work.put(None)  # for the next thread
