"""Single-flight cache fills: one upstream download per image, owned by the registry.

A fill streams Glance's body into a partial file, hashing it on a thread of its own as it
goes, verifies size and hash, and commits the file into the store by rename. Any number of
clients read the partial file while it grows; they wait on progress notifications, and the
last bytes of every response are held back until verification passes. No request owns a
fill: a client leaving, the first one included, changes nothing for the others.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
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
        self.written = 0
        self.verified = False
        self.failure: str | None = None
        self.failure_outcome = ""
        self._read_fd: int | None = None
        self._ended = False
        self._changed = asyncio.Event()

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
        """How far a response ending at ``end`` may be sent now. Raises FillFailed."""
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

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class _DiskAndHashSink:
    """Writes a fill's chunks to its file and hashes them, each on a thread of its own,
    in order; ``on_written`` runs on the loop after each chunk is on disk."""

    def __init__(self, fd: int, expected: Expected, on_written: Any) -> None:
        self._fd = fd
        self._hasher = expected.new_hasher()
        self._on_written = on_written
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="imgcache-fill-write")
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="imgcache-fill-hash")
        self._pending: collections.deque[tuple[int, asyncio.Future[Any], asyncio.Future[Any]]]
        self._pending = collections.deque()
        self._buffered = 0

    async def feed(self, chunk: bytes) -> None:
        """Queue a chunk; waits only when MAX_BUFFERED bytes are still queued."""
        loop = asyncio.get_running_loop()
        write = loop.run_in_executor(self._writer, _write_all, self._fd, chunk)
        write.add_done_callback(functools.partial(self._written, len(chunk)))
        hashed = (loop.run_in_executor(self._hashing, self._hasher.update, chunk)
                  if self._hasher is not None else write)
        self._pending.append((len(chunk), write, hashed))
        self._buffered += len(chunk)
        while self._buffered > MAX_BUFFERED:
            await self._settle_oldest()

    def _written(self, count: int, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and write.exception() is None:
            self._on_written(count)

    async def finish(self) -> str | None:
        """Wait for every queued chunk; return the hex digest (None when only size counts)."""
        while self._pending:
            await self._settle_oldest()
        if self._hasher is None:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hashing, self._hasher.hexdigest)

    async def _settle_oldest(self) -> None:
        size, write, hashed = self._pending.popleft()
        self._buffered -= size
        try:
            await write
        except OSError as exc:
            raise FillError(f"writing the cache file failed: {exc}", "disk_error") from exc
        await hashed

    async def close(self) -> None:
        """Stop the threads, after letting queued work end (never leaves a thread writing)."""
        await asyncio.gather(*(f for _, w, h in self._pending for f in (w, h)),
                             return_exceptions=True)
        self._writer.shutdown(wait=False)
        self._hashing.shutdown(wait=False)


def _create_partial(path: os.PathLike[str]) -> tuple[int, int]:
    """Create a fill's file; return a write fd and a read fd (shared by its readers)."""
    write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    return write_fd, os.open(path, os.O_RDONLY)


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]


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
            sink = _DiskAndHashSink(write_fd, fill.expected, lambda n: self._advance(fill, n))
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

    def _advance(self, fill: Fill, count: int) -> None:
        fill.written += count
        fill._notify()

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
