"""Where downloaded image bytes go off the event loop: written to a cache file and hashed
(a fill), or only hashed (a download streamed through to one client).

Each consumer (the writer, the hasher) runs on a thread of the pipeline pool, started
before serving, and takes the pieces the loop queued, in order; each holds its own reference
to a piece (``pieces.Piece``) and releases it once written or hashed, so that the receive
buffer it lies in is reused only after both are done with it. The loop only queues: a
``feed`` waits only while MAX_BUFFERED bytes are still queued, which bounds a download's
memory whatever the image size.

Who writes what: the loop writes ``_fed`` and puts chunks on the queues; each consumer
thread alone writes its own ``done`` count and ``error``; the loop reads them (an int or a
reference read is atomic in CPython, and a stale read only makes ``feed`` wait once more).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from imgcache.digest import Expected
from imgcache.errors import FillError
from imgcache.pieces import Piece
from imgcache.threadnames import HASHING, WRITING, show_thread_name

#: Bytes received but not yet consumed by every consumer; bounds a download's memory.
MAX_BUFFERED = 16 << 20
#: A ``feed`` waiting on MAX_BUFFERED is woken once the backlog fell to this, not at each
#: piece consumed: one thread round trip of the loop per few MiB while the threads bound.
RESUME_BUFFERED = MAX_BUFFERED // 2
#: Most chunks the writer puts in one writev(2) (IOV_MAX is 1024).
_MAX_WRITE_BATCH = 64


class _Consumer:
    """One thread's share of a pipeline: takes queued pieces, in order, until the end mark;
    it releases each piece it took."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_feeder: Callable[[], None]) -> None:
        self._loop = loop
        self._wake_feeder = wake_feeder
        self.chunks: queue.SimpleQueue[Piece | None] = queue.SimpleQueue()
        self.done = 0  # bytes consumed; written by the consumer's thread only
        self.error: BaseException | None = None  # likewise
        self.finished: asyncio.Future[Any] | None = None  # set by start()

    def start(self, pool: Executor) -> None:
        """Run the consumer on a pool thread."""
        self.finished = self._loop.run_in_executor(pool, self._run)

    def _run(self) -> Any:
        try:
            return self.consume()
        except BaseException as exc:  # reported to the loop through ``error``
            self.error = exc
            self._release_queued()
            return None
        finally:
            self._wake_feeder()

    def _release_queued(self) -> None:
        """After a failure: give back the pieces still queued. Held, they would keep their
        receive buffers from the download, which may be paused until those come free and
        would never read on to the ``feed`` that raises this failure. (A piece queued after
        this is followed by that raise in the same ``feed``.)"""
        with contextlib.suppress(queue.Empty):
            while True:
                chunk = self.chunks.get_nowait()
                if chunk is not None:
                    chunk.release()

    def consume(self) -> Any:
        """Runs on the thread: take pieces until the end mark (releasing each); return the
        result."""
        raise NotImplementedError

    def progressed(self, count: int) -> None:
        """Runs on the thread: ``count`` more bytes consumed."""
        self.done += count
        self._wake_feeder()


class _Writer(_Consumer):
    """Writes chunks to a file with as few writev(2) calls as the kernel allows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_feeder: Callable[[], None],
                 fd: int, on_written: Callable[[int], None]) -> None:
        super().__init__(loop, wake_feeder)
        self._fd = fd
        self._on_written = on_written

    def consume(self) -> None:
        show_thread_name(WRITING)
        while True:
            chunks = _take_queued(self.chunks)
            last = chunks[-1] is None
            if last:
                chunks.pop()
            if chunks:
                try:
                    count = _writev_all(self._fd, chunks)  # type: ignore[arg-type]
                finally:
                    for chunk in chunks:
                        chunk.release()  # type: ignore[union-attr]
                self._on_written(count)
                self.progressed(count)
            if last:
                return


class _Hasher(_Consumer):
    """Feeds chunks to a hashlib object; returns the hex digest."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_feeder: Callable[[], None],
                 hasher: Any) -> None:
        super().__init__(loop, wake_feeder)
        self._hasher = hasher

    def consume(self) -> str:
        show_thread_name(HASHING)
        while (chunk := self.chunks.get()) is not None:
            try:
                self._hasher.update(chunk.view)
            finally:
                chunk.release()
            self.progressed(len(chunk))
        return str(self._hasher.hexdigest())


class _Pipeline:
    """Chunks fed on the loop to consumer threads, with a bound on what is queued."""

    def __init__(self, pool: Executor) -> None:
        self._loop = asyncio.get_running_loop()
        self._pool = pool
        self._consumers: list[_Consumer] = []
        self._fed = 0
        self._wake: asyncio.Future[None] | None = None  # set while feed waits for the threads
        self._ended = False

    def _add(self, consumer: _Consumer) -> None:
        self._consumers.append(consumer)
        consumer.start(self._pool)

    async def feed(self, chunk: Piece) -> None:
        """Queue a piece for every consumer (each holds a reference of its own: the caller
        may release its own at once); waits only while MAX_BUFFERED bytes are still queued.
        Raises the error of a consumer that failed."""
        self._raise_if_failed()
        self._fed += len(chunk)
        chunk.retain(len(self._consumers))
        for consumer in self._consumers:
            consumer.chunks.put(chunk)
        while self._backlog() > MAX_BUFFERED and not self._failed():
            wake = self._wake = self._loop.create_future()
            if self._backlog() <= MAX_BUFFERED or self._failed():
                break  # the threads moved on before they could see the future
            await wake
        self._raise_if_failed()

    async def close(self) -> None:
        """Stop the threads after the work queued so far (never leaves a thread running)."""
        self._end()
        await asyncio.gather(*(c.finished for c in self._consumers if c.finished),
                             return_exceptions=True)

    async def _finish(self) -> list[Any]:
        self._end()
        results = [await c.finished for c in self._consumers if c.finished]
        self._raise_if_failed()
        return results

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            for consumer in self._consumers:
                consumer.chunks.put(None)

    def _backlog(self) -> int:
        return self._fed - min((c.done for c in self._consumers), default=self._fed)

    def _failed(self) -> bool:
        return any(c.error is not None for c in self._consumers)

    def _raise_if_failed(self) -> None:
        for consumer in self._consumers:
            if consumer.error is not None:
                self._raise(consumer, consumer.error)

    def _raise(self, consumer: _Consumer, error: BaseException) -> None:
        raise error

    def _wake_feeder(self) -> None:
        """Runs on the threads after progress: let a waiting ``feed`` look again once the
        backlog is down to RESUME_BUFFERED or a consumer failed."""
        if self._wake is None or (self._backlog() > RESUME_BUFFERED and not self._failed()):
            return
        wake, self._wake = self._wake, None
        if wake is not None:
            call_on_loop(self._loop, _resolve, wake)


class DiskAndHashSink(_Pipeline):
    """A fill's bytes: written to its partial file and hashed, each on a thread of its own.
    ``on_written`` runs on the writer thread after each batch is on disk."""

    def __init__(self, pool: Executor, fd: int, expected: Expected,
                 on_written: Callable[[int], None]) -> None:
        super().__init__(pool)
        self._writer = _Writer(self._loop, self._wake_feeder, fd, on_written)
        self._add(self._writer)
        hasher = expected.new_hasher()
        self._hasher = _Hasher(self._loop, self._wake_feeder, hasher) if hasher else None
        if self._hasher is not None:
            self._add(self._hasher)

    async def finish(self) -> str | None:
        """Wait for every queued chunk; return the hex digest (None when only size counts).
        Raises FillError("disk_error") if a write failed."""
        results = await self._finish()
        return results[1] if self._hasher is not None else None

    def _raise(self, consumer: _Consumer, error: BaseException) -> None:
        if consumer is self._writer and isinstance(error, OSError):
            raise FillError(f"writing the cache file failed: {error}", "disk_error")
        raise error


class HashSink(_Pipeline):
    """Bytes that are only hashed (a download streamed through to a client), on a thread."""

    def __init__(self, pool: Executor, hasher: Any) -> None:
        super().__init__(pool)
        self._add(_Hasher(self._loop, self._wake_feeder, hasher))

    async def finish(self) -> str:
        """Wait for every queued chunk; return the hex digest."""
        [digest] = await self._finish()
        return str(digest)


def _take_queued(chunks: queue.SimpleQueue[Piece | None]) -> list[Piece | None]:
    """Wait for one chunk, then take whatever else is queued already (up to a batch)."""
    batch = [chunks.get()]
    while len(batch) < _MAX_WRITE_BATCH and batch[-1] is not None:
        try:
            batch.append(chunks.get_nowait())
        except queue.Empty:
            break
    return batch


def _writev_all(fd: int, chunks: list[Piece]) -> int:
    """Write every piece, in order, with as few writev(2) calls as the kernel allows."""
    views = [chunk.view for chunk in chunks]
    total = sum(len(view) for view in views)
    while views:
        done = os.writev(fd, views)
        while done and views:
            if done >= len(views[0]):
                done -= len(views.pop(0))
            else:
                views[0], done = views[0][done:], 0
    return total


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def call_on_loop(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """From a thread: run ``callback`` on the loop, unless the loop is closed already
    (a thread outliving an interrupted shutdown has no one left to tell)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)
