"""Single-flight cache fills: one upstream download per image, owned by the registry.

A fill streams Glance's body into a partial file, hashing it on a thread of its own as it
goes, verifies size and hash, and commits the file into the store by rename. Any number of
clients read the partial file while it grows; they wait on progress notifications, and the
last bytes of every response are held back until verification passes. No request owns a
fill: a client leaving, the first one included, changes nothing for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imgcache.digest import Expected
from imgcache.errors import FillError, NoSpace, UpstreamError
from imgcache.metrics import Metrics
from imgcache.store import Entry, Reservation, Store
from imgcache.transfer import ResumableDownload
from imgcache.upstream import Upstream

log = logging.getLogger(__name__)

#: Bytes of each response withheld until the fill that feeds it is verified.
HOLD_BACK_BYTES = 64 * 1024
#: Bytes read from Glance but not yet written and hashed; bounds a fill's memory.
MAX_BUFFERED = 16 << 20
#: Readers waiting for a fill are woken when this many new bytes are on disk, or at the
#: latest every ANNOUNCE_SECONDS; readers already sending pick up new bytes on their own.
#: Each wake-up costs the event loop a worker-thread round trip per reader: in a storm of
#: 32 clients on a 1 Gbit/s link, waking them every 20 ms kept the loop from answering
#: new clients for tenths of a second.
ANNOUNCE_BYTES = 16 << 20
ANNOUNCE_SECONDS = 0.1
#: Most chunks the writer thread puts in one writev(2) (IOV_MAX is 1024).
_MAX_WRITE_BATCH = 64


class FillFailed(Exception):
    """Raised to readers of a fill that failed; ``outcome`` says why (a FILL_OUTCOMES label).
    A reader must abort its response, or, after a disk error, finish it from Glance."""

    def __init__(self, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


class Fill:
    """One in-flight download of one image into a partial file."""

    def __init__(self, image_id: str, expected: Expected, path: os.PathLike[str]) -> None:
        self.image_id = image_id
        self.expected = expected
        self.path = path
        self.written = 0  # bytes on disk; raised by the fill's writer thread
        self.verified = False
        self.failure: str | None = None
        self.failure_outcome = ""
        self._read_fd: int | None = None
        self._ended = False
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._announced = 0
        self._announce_pending = False
        self._ticker: asyncio.TimerHandle | None = None

    async def open_reader(self) -> int | None:
        """A new fd on the fill's file for one reader, who closes it; None if the fill
        ended before its file could be opened (look the image up again). The fd stays
        valid after the file is renamed into the cache, so a reader finishes what it began."""
        while self._read_fd is None and not self.ended:
            await self.wait_for_progress()
        return None if self._read_fd is None else os.dup(self._read_fd)

    @property
    def ended(self) -> bool:
        """True once the fill committed or failed (its file is closed then)."""
        return self._ended

    def readable_until(self, end: int) -> int:
        """How far a response ending at ``end`` may be sent now. Raises FillFailed. Safe on
        any thread: readers sending on worker threads go on with what is written meanwhile."""
        if self.verified:
            return end
        if self.failure is not None:
            raise FillFailed(self.failure, self.failure_outcome)
        return min(self.written, max(0, end - HOLD_BACK_BYTES))

    async def wait_ended(self) -> None:
        """Return once the fill committed or failed."""
        while not self._ended:
            await self.wait_for_progress()

    async def wait_for_progress(self) -> None:
        """Return after the next change: more bytes written, verified, or failed."""
        await self._changed.wait()

    def add_written(self, count: int) -> None:
        """Runs on the writer thread: ``count`` more bytes are on disk. Readers waiting for
        them are woken once ANNOUNCE_BYTES have piled up or at the next tick, not for each
        write: every wake-up costs the loop a round trip to a worker thread per reader."""
        self.written += count
        if self.written - self._announced >= ANNOUNCE_BYTES and not self._announce_pending:
            self._announce_pending = True
            _call_on_loop(self._loop, self._announce)

    def start_ticking(self) -> None:
        """Wake waiting readers every ANNOUNCE_SECONDS while bytes trickle in."""
        self._announce()
        self._ticker = self._loop.call_later(ANNOUNCE_SECONDS, self.start_ticking)

    def stop_ticking(self) -> None:
        """The download is over: stop the periodic wake-ups."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _announce(self) -> None:
        self._announce_pending = False
        if self.written != self._announced:
            self._announced = self.written
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class _DiskAndHashSink:
    """Writes a fill's chunks to its file and hashes them, each on a thread of its own, in
    order. The loop only queues chunks: the writer thread batches what is queued into one
    writev(2) and reports each batch to the fill itself."""

    def __init__(self, fd: int, expected: Expected, fill: Fill) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._fill = fill
        self._to_write: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._fed = self._written = self._hashed = 0
        self._write_error: OSError | None = None
        self._wake: asyncio.Future[None] | None = None  # set while feed waits for the threads
        self._finishing = False
        self._written_all: asyncio.Future[None] = self._loop.create_future()
        self._digest: asyncio.Future[str | None] = self._loop.create_future()
        hasher = expected.new_hasher()
        threading.Thread(target=self._write_all_queued, name="imgcache-fill-write",
                         daemon=True).start()
        if hasher is None:
            self._hashing = False
            self._digest.set_result(None)
        else:
            self._hashing = True
            threading.Thread(target=self._hash_all_queued, args=(hasher,),
                             name="imgcache-fill-hash", daemon=True).start()

    async def feed(self, chunk: bytes) -> None:
        """Queue a chunk; waits only while MAX_BUFFERED bytes are still queued."""
        self._raise_if_failed()
        self._fed += len(chunk)
        self._to_write.put(chunk)
        if self._hashing:
            self._to_hash.put(chunk)
        while self._backlog() > MAX_BUFFERED and self._write_error is None:
            wake = self._wake = self._loop.create_future()
            if self._backlog() <= MAX_BUFFERED:  # the threads moved on before they could see it
                break
            await wake
        self._raise_if_failed()

    async def finish(self) -> str | None:
        """Wait for every queued chunk; return the hex digest (None when only size counts)."""
        self._end_queues()
        await self._written_all
        self._raise_if_failed()
        return await self._digest

    async def close(self) -> None:
        """Stop the threads after the work queued so far (never leaves a thread writing)."""
        self._end_queues()
        await asyncio.gather(self._written_all, self._digest, return_exceptions=True)

    def _backlog(self) -> int:
        return self._fed - min(self._written, self._hashed if self._hashing else self._fed)

    def _raise_if_failed(self) -> None:
        if self._write_error is not None:
            raise FillError(f"writing the cache file failed: {self._write_error}",
                            "disk_error")

    def _end_queues(self) -> None:
        if not self._finishing:
            self._finishing = True
            self._to_write.put(None)
            self._to_hash.put(None)

    def _wake_feeder(self) -> None:
        """Runs on the threads after progress: let a waiting ``feed`` look again."""
        wake, self._wake = self._wake, None
        if wake is not None:
            _call_on_loop(self._loop, _resolve, wake, None)

    def _write_all_queued(self) -> None:
        try:
            while True:
                chunks = _take_queued(self._to_write)
                last = chunks[-1] is None
                if last:
                    chunks.pop()
                if chunks:
                    count = _writev_all(self._fd, chunks)
                    self._written += count
                    self._fill.add_written(count)
                    self._wake_feeder()
                if last:
                    break
        except OSError as exc:
            self._write_error = exc
            self._wake_feeder()
        finally:
            _call_on_loop(self._loop, _resolve, self._written_all, None)

    def _hash_all_queued(self, hasher: Any) -> None:
        try:
            while (chunk := self._to_hash.get()) is not None:
                hasher.update(chunk)
                self._hashed += len(chunk)
                self._wake_feeder()
            _call_on_loop(self._loop, _resolve, self._digest, hasher.hexdigest())
        except Exception as exc:  # handed to the fill, which fails
            _call_on_loop(self._loop, _reject, self._digest, exc)


def _take_queued(chunks: queue.SimpleQueue[bytes | None]) -> list[bytes | None]:
    """Wait for one chunk, then take whatever else is queued already (up to a batch)."""
    batch = [chunks.get()]
    while len(batch) < _MAX_WRITE_BATCH and batch[-1] is not None:
        try:
            batch.append(chunks.get_nowait())
        except queue.Empty:
            break
    return batch


def _writev_all(fd: int, chunks: list[bytes]) -> int:
    """Write every chunk, in order, with as few writev(2) calls as the kernel allows."""
    views = [memoryview(chunk) for chunk in chunks]
    total = sum(len(view) for view in views)
    while views:
        done = os.writev(fd, views)
        while done and views:
            if done >= len(views[0]):
                done -= len(views.pop(0))
            else:
                views[0], done = views[0][done:], 0
    return total


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _call_on_loop(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """From a thread: run ``callback`` on the loop, unless the loop is closed already
    (a daemon thread outliving an interrupted shutdown has no one left to tell)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _create_partial(path: os.PathLike[str]) -> tuple[int, int]:
    """Create a fill's file; return a write fd and a read fd (shared by its readers)."""
    write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    return write_fd, os.open(path, os.O_RDONLY)


class FillRegistry:
    """The fills in flight, one per image at most; it owns their tasks."""

    def __init__(self, store: Store, upstream: Upstream, metrics: Metrics,
                 files: ThreadPoolExecutor, *, retries: int, retry_backoff: float) -> None:
        self._store = store
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._upstream = upstream
        self._metrics = metrics
        self._files = files
        self._fills: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def in_flight(self) -> list[Fill]:
        """Fills downloading now."""
        return list(self._fills.values())

    def join_or_start(self, image_id: str, expected: Expected, path_qs: str,
                      headers: Mapping[str, str]) -> tuple[Fill, bool] | Entry:
        """The fill of this image content to read from and whether this call started it; or
        the committed entry if one appeared meanwhile. Raises NoSpace when it cannot be
        cached. Synchronous, so that two callers can never both start a fill."""
        fill = self._fills.get(image_id)
        if fill is not None and fill.expected == expected:
            return fill, False
        entry = self._store.lookup(image_id, expected.key)
        if entry is not None:
            return entry
        if fill is not None:
            raise NoSpace("a fill of older content of this image is still running")
        reservation = self._store.reserve(expected.size)
        fill = Fill(image_id, expected, self._store.new_partial_path(image_id))
        self._fills[image_id] = fill
        task = asyncio.get_running_loop().create_task(
            self._run(fill, reservation, path_qs, dict(headers)), name=f"fill-{image_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._metrics.fills_in_progress.inc()
        return fill, True

    async def wait_idle(self) -> None:
        """Return once no fill is running (each committed or failed)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every fill (their partial files are removed) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, fill: Fill, reservation: Reservation, path_qs: str,
                   headers: dict[str, str]) -> None:
        outcome = "committed"
        write_fd = -1
        sink: _DiskAndHashSink | None = None
        try:
            write_fd, fill._read_fd = await asyncio.get_running_loop().run_in_executor(
                self._files, _create_partial, fill.path)
            fill._notify()
            sink = _DiskAndHashSink(write_fd, fill.expected, fill)
            fill.start_ticking()
            digest = await self._download(fill, sink, path_qs, headers)
            if fill.written != fill.expected.size:
                raise FillError(f"Glance sent {fill.written} bytes, its metadata says "
                                f"{fill.expected.size}", "size_mismatch")
            if not fill.expected.matches(digest, fill.written):
                self._metrics.checksum_failures.inc()
                raise FillError(f"{fill.expected.algo} of the downloaded bytes is {digest}, "
                                f"Glance says {fill.expected.value}", "checksum_mismatch")
            self._metrics.verifications.labels(fill.expected.method).inc()
            fill.verified = True
            fill._notify()
            await self._store.commit(reservation, fill.path, fill.image_id, fill.expected.key)
            log.info("cached image %s (%d bytes, verified by %s)", fill.image_id,
                     fill.written, fill.expected.method)
        except FillError as exc:
            outcome = exc.outcome
            self._fail(fill, reservation, str(exc), outcome)
        except UpstreamError as exc:
            outcome = "upstream_error"
            self._fail(fill, reservation, str(exc), outcome)
        except OSError as exc:
            outcome = "disk_error"
            self._fail(fill, reservation, f"cache disk error: {exc}", outcome)
        except asyncio.CancelledError:
            outcome = "cancelled"
            self._fail(fill, reservation, "imgcache is shutting down", outcome)
            raise
        finally:
            fill.stop_ticking()
            if sink is not None:
                await sink.close()
            for fd in (write_fd, fill._read_fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
            fill._read_fd = None
            fill._ended = True
            fill._notify()
            self._metrics.fills.labels(outcome).inc()
            self._metrics.fills_in_progress.dec()
            if self._fills.get(fill.image_id) is fill:
                del self._fills[fill.image_id]

    async def _download(self, fill: Fill, sink: _DiskAndHashSink, path_qs: str,
                        headers: dict[str, str]) -> str | None:
        await self.new_download().run(path_qs, headers, fill.expected.size, sink.feed)
        return await sink.finish()

    def set_retry_policy(self, retries: int, backoff: float) -> None:
        """Change retries and backoff for fills started from now on (a reload)."""
        self._retries, self._retry_backoff = retries, backoff

    def new_download(self) -> ResumableDownload:
        """A download from Glance with this registry's retry policy."""
        return ResumableDownload(self._upstream, self._metrics, retries=self._retries,
                                 backoff=self._retry_backoff)

    def _fail(self, fill: Fill, reservation: Reservation, reason: str, outcome: str) -> None:
        log.error("fill of image %s failed after %d of %d bytes: %s; nothing was cached",
                  fill.image_id, fill.written, fill.expected.size, reason)
        if outcome == "disk_error":
            self._store.disk_failed(reason)
        fill.failure = reason
        fill.failure_outcome = outcome
        fill._notify()
        if self._fills.get(fill.image_id) is fill:
            del self._fills[fill.image_id]
        self._store.release(reservation)
        self._store.discard_partial(fill.path)
