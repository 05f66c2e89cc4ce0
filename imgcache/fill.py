"""Single-flight cache fills: one upstream download per image, owned by the registry.

A fill streams Glance's body into a partial file (written and hashed off the loop by
``sink.DiskAndHashSink``), verifies size and hash, and commits the file into the store by
rename. Any number of clients read the partial file while it grows; the last bytes of every
response are held back until verification passes. No request owns a fill: a client leaving,
the first one included, changes nothing for the others, and the fill downloads with the
credentials of every caller Glance allowed, not only the first one's.

A fill's states: downloading -> verified -> committed, or failed (from downloading, or from
verified when the commit fails: its readers already have every verified byte then).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from imgcache.config import format_size
from imgcache.credentials import AllowedCallers
from imgcache.digest import Expected
from imgcache.errors import FillError, NoSpace, UpstreamError
from imgcache.keys import data_path
from imgcache.metrics import Metrics
from imgcache.sink import DiskAndHashSink, call_on_loop
from imgcache.store import Entry, Reservation, Store
from imgcache.tier import SourcePlan, Tier
from imgcache.transfer import GlanceRefused, ResumableDownload
from imgcache.upstream import Upstream

log = logging.getLogger(__name__)

#: Bytes of each response withheld until the fill that feeds it is verified.
HOLD_BACK_BYTES = 64 * 1024
#: Readers waiting for a fill are woken when this many new bytes are on disk, or at the
#: latest every ANNOUNCE_SECONDS; readers already sending pick up new bytes on their own.
#: Each wake-up costs the event loop a worker-thread round trip per reader: in a storm of
#: 32 clients on a 1 Gbit/s link, waking them every 20 ms kept the loop from answering
#: new clients for tenths of a second.
ANNOUNCE_BYTES = 16 << 20
ANNOUNCE_SECONDS = 0.1


class FillState(enum.Enum):
    """Where a fill is in its life."""

    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    COMMITTED = "committed"
    FAILED = "failed"


class FillFailed(Exception):
    """Raised to readers of a fill that failed. ``outcome`` says why (a FILL_OUTCOMES label);
    ``status`` is what a reader that has not answered its client yet answers (with
    ``refusal``, Glance's own answer, when Glance refused every caller). A reader that has
    answered must abort its response, or, after a disk error, finish it from Glance."""

    def __init__(self, reason: str, outcome: str, status: int,
                 refusal: GlanceRefused | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.status = status
        self.refusal = refusal

    def again(self) -> FillFailed:
        """The same failure as a new exception, to raise in another reader (several threads
        raising one exception object would tangle its traceback)."""
        return FillFailed(str(self), self.outcome, self.status, self.refusal)


class Fill:
    """One in-flight download of one image into a partial file.

    Who writes what: ``written`` is raised by the fill's writer thread (``add_written``);
    every other field changes on the loop, through the methods the registry calls. Readers'
    sending threads read the state through ``readable_until``, and ``written`` also directly
    (whether a window of the file is finished: ``mapped_windows``).
    """

    def __init__(self, image_id: str, expected: Expected, path: os.PathLike[str],
                 callers: AllowedCallers) -> None:
        self.image_id = image_id
        self.expected = expected
        self.path = path
        self.callers = callers
        self.written = 0
        self.state = FillState.DOWNLOADING
        self._verified = False  # stays True if a commit fails: readers may finish
        self._failure: FillFailed | None = None
        self._read_fd: int | None = None
        self._ended = False
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._announced = 0
        self._announce_pending = False
        self._ticker: asyncio.TimerHandle | None = None

    # -- what readers use ----------------------------------------------------------------

    @property
    def verified(self) -> bool:
        """True once every byte matched Glance's size and hash."""
        return self._verified

    @property
    def ended(self) -> bool:
        """True once the fill committed or failed (its file is closed then)."""
        return self._ended

    @property
    def failure(self) -> FillFailed | None:
        """Why the fill failed, once it did."""
        return self._failure

    async def open_reader(self) -> int | None:
        """A new fd on the fill's file for one reader, who closes it; None if the fill
        ended before its file could be opened (look the image up again). The fd stays
        valid after the file is renamed into the cache, so a reader finishes what it began."""
        while self._read_fd is None and not self._ended:
            await self.wait_for_progress()
        return None if self._read_fd is None else os.dup(self._read_fd)

    async def wait_streaming(self) -> None:
        """Return once Glance's bytes are arriving (the first ones are on disk), so that a
        reader answers its client only then. Raises FillFailed if the fill failed first."""
        while self.written == 0 and not self._verified:
            if self._failure is not None:
                raise self._failure.again()
            await self.wait_for_progress()

    def readable_until(self, end: int) -> int:
        """How far a response ending at ``end`` may be sent now. Raises FillFailed. Safe on
        any thread: readers sending on worker threads go on with what is written meanwhile."""
        if self._verified:
            return end
        if self._failure is not None:
            raise self._failure.again()
        return min(self.written, max(0, end - HOLD_BACK_BYTES))

    async def wait_ended(self) -> None:
        """Return once the fill committed or failed."""
        while not self._ended:
            await self.wait_for_progress()

    async def wait_for_progress(self) -> None:
        """Return after the next change: more bytes written, verified, or failed."""
        await self._changed.wait()

    # -- transitions (the registry's fill task, on the loop; add_written on the writer) ----

    def opened(self, read_fd: int) -> None:
        """The partial file exists: readers may open it."""
        self._read_fd = read_fd
        self._notify()
        self._tick()

    def add_written(self, count: int) -> None:
        """Runs on the writer thread: ``count`` more bytes are on disk. Readers waiting for
        them are woken once ANNOUNCE_BYTES have piled up or at the next tick, not for each
        write: every wake-up costs the loop a round trip to a worker thread per reader. The
        first bytes are announced at once: every client waits for them before its first byte."""
        self.written += count
        if ((self._announced == 0 or self.written - self._announced >= ANNOUNCE_BYTES)
                and not self._announce_pending):
            self._announce_pending = True
            call_on_loop(self._loop, self._announce)

    def passed_verification(self) -> None:
        """Every byte matched: release the held-back tails."""
        self.state = FillState.VERIFIED
        self._verified = True
        self._notify()

    def committed(self) -> None:
        """The file is in the cache."""
        self.state = FillState.COMMITTED

    def failed(self, failure: FillFailed) -> None:
        """The download, its verification or the commit failed."""
        self.state = FillState.FAILED
        self._failure = failure
        self._notify()

    def closing(self) -> None:
        """The fill's files are about to be closed (on a thread): no reader may dup the
        shared read fd from now on (``open_reader`` waits for ``closed`` and answers None)."""
        self._read_fd = None

    def closed(self) -> None:
        """The fill is over and its file closed: wake every reader."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self._read_fd = None
        self._ended = True
        self._notify()

    def _tick(self) -> None:
        """Wake waiting readers every ANNOUNCE_SECONDS while bytes trickle in."""
        self._announce()
        if not self._ended:
            self._ticker = self._loop.call_later(ANNOUNCE_SECONDS, self._tick)

    def _announce(self) -> None:
        self._announce_pending = False
        if self.written != self._announced:
            self._announced = self.written
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


@dataclass(frozen=True)
class Joined:
    """A fill to read from; ``started`` when this call started it."""

    fill: Fill
    started: bool


@dataclass(frozen=True)
class Cached:
    """The image's committed entry (it appeared while the caller looked)."""

    entry: Entry


@dataclass(frozen=True)
class Bypass:
    """The image cannot be cached now; ``reason`` says why (logged)."""

    reason: str


def _create_partial(path: os.PathLike[str]) -> tuple[int, int]:
    """Create a fill's file; return a write fd and a read fd (shared by its readers)."""
    write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        return write_fd, os.open(path, os.O_RDONLY)
    except OSError:
        os.close(write_fd)
        raise


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class FillRegistry:
    """The fills in flight, one per image at most; it owns their tasks."""

    def __init__(self, store: Store, upstream: Upstream, metrics: Metrics,
                 control: ThreadPoolExecutor, pipeline: Executor, *,
                 retries: int, retry_backoff: float, tier: Tier | None = None) -> None:
        self._store = store
        self._tier = tier
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._upstream = upstream
        self._metrics = metrics
        self._control = control
        self._pipeline = pipeline
        self._fills: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def in_flight(self) -> list[Fill]:
        """Fills downloading now."""
        return list(self._fills.values())

    def join_or_start(self, image_id: str, expected: Expected,
                      headers: Mapping[str, str]) -> Joined | Cached | Bypass:
        """Where a caller Glance allowed (its request ``headers``) reads this image content
        from: the fill in flight (joined, the caller's credentials added to it), a new fill,
        the committed entry if one appeared meanwhile, or Bypass when it cannot be cached
        now. Synchronous, so that two callers can never both start a fill. A new fill
        downloads through the tier when one is configured."""
        fill = self._fills.get(image_id)
        if fill is not None and fill.expected == expected:
            fill.callers.add(headers)
            return Joined(fill, started=False)
        entry = self._store.current_entry(image_id, expected.key)
        if entry is not None:
            return Cached(entry)
        if fill is not None:
            return Bypass("a fill of older content of this image is still running")
        try:
            fill = self._start(image_id, expected, AllowedCallers(headers),
                               self._tier.plan(image_id) if self._tier is not None else None)
        except NoSpace as exc:
            return Bypass(str(exc))
        return Joined(fill, started=True)

    def _start(self, image_id: str, expected: Expected, callers: AllowedCallers,
               plan: SourcePlan | None) -> Fill:
        """Reserve room and start a fill (through the tier along ``plan``, else straight
        from Glance). Raises NoSpace."""
        reservation = self._store.reserve(expected.size)
        fill = Fill(image_id, expected, self._store.new_partial_path(image_id), callers)
        self._fills[image_id] = fill
        task = asyncio.get_running_loop().create_task(
            self._run(fill, reservation, plan), name=f"fill-{image_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._metrics.fills_in_progress.inc()
        return fill

    async def wait_idle(self) -> None:
        """Return once no fill is running (each committed or failed)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every fill (their partial files are removed) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def set_retry_policy(self, retries: int, backoff: float) -> None:
        """Change retries and backoff for fills started from now on (a reload)."""
        self._retries, self._retry_backoff = retries, backoff

    def new_download(self, plan: SourcePlan | None = None) -> ResumableDownload:
        """A download with this registry's retry policy: from Glance, or through the tier
        along ``plan``."""
        return ResumableDownload(self._upstream, self._metrics, retries=self._retries,
                                 backoff=self._retry_backoff, plan=plan)

    async def _run(self, fill: Fill, reservation: Reservation,
                   plan: SourcePlan | None) -> None:
        outcome = "committed"
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        sink: DiskAndHashSink | None = None
        try:
            write_fd, read_fd = await loop.run_in_executor(
                self._control, _create_partial, fill.path)
            fds += [write_fd, read_fd]
            fill.opened(read_fd)
            sink = DiskAndHashSink(self._pipeline, write_fd, fill.expected, fill.add_written)
            await self.new_download(plan).run(data_path(fill.image_id), fill.callers,
                                              fill.expected.size, sink.feed)
            digest = await sink.finish()
            self._verify(fill, digest)
            fill.passed_verification()
            await self._store.commit(reservation, fill.path, fill.image_id, fill.expected.key)
            fill.committed()
            log.info("cached image %s (%s, verified by %s)", fill.image_id,
                     format_size(fill.written), fill.expected.method)
        except GlanceRefused as exc:
            outcome = exc.outcome
            self._fail(fill, reservation, str(exc), outcome, 502, exc)
        except FillError as exc:
            outcome = exc.outcome
            self._fail(fill, reservation, str(exc), outcome, 502)
            if (outcome == "checksum_mismatch" and plan is not None
                    and plan.reject_tier_bytes(data_path(fill.image_id))):
                self._refill_from_glance(fill)
        except UpstreamError as exc:
            outcome = "upstream_error"
            self._fail(fill, reservation, str(exc), outcome, exc.status)
        except OSError as exc:
            outcome = "disk_error"
            self._fail(fill, reservation, f"cache disk error: {exc}", outcome, 503)
        except asyncio.CancelledError:
            outcome = "cancelled"
            self._fail(fill, reservation, "imgcache is shutting down", outcome, 503)
            raise
        except Exception as exc:
            outcome = "internal_error"
            log.exception("fill of image %s failed on an unexpected error", fill.image_id)
            self._fail(fill, reservation, f"internal error: {exc!r}", outcome, 500)
        finally:
            if sink is not None:
                await sink.close()
            # Closed on a thread once the sink's threads are done with the write fd; no
            # reader uses the shared read fd itself (each has its own dup).
            if fds:
                fill.closing()
                await loop.run_in_executor(self._control, _close_fds, fds)
            fill.closed()
            self._metrics.fills.labels(outcome).inc()
            self._metrics.fills_in_progress.dec()
            self._forget(fill)

    def _refill_from_glance(self, fill: Fill) -> None:
        """The tier's bytes of ``fill`` were corrupt: download the image again at once,
        straight from Glance with the same callers' credentials, so that the cache has it
        for the next request (this fill's readers were cut, as for any failed fill)."""
        if fill.image_id in self._fills:
            return  # a request started a new fill already
        try:
            self._start(fill.image_id, fill.expected, fill.callers, None)
        except NoSpace as exc:
            log.warning("image %s is not downloaded again from Glance: %s", fill.image_id,
                        exc)

    def _verify(self, fill: Fill, digest: str | None) -> None:
        if fill.written != fill.expected.size:
            raise FillError(f"Glance sent {fill.written} bytes, its metadata says "
                            f"{fill.expected.size}", "size_mismatch")
        if not fill.expected.matches(digest, fill.written):
            self._metrics.checksum_failures.inc()
            raise FillError(f"{fill.expected.algo} of the downloaded bytes is {digest}, "
                            f"Glance says {fill.expected.value}", "checksum_mismatch")
        self._metrics.verifications.labels(fill.expected.method).inc()

    def _fail(self, fill: Fill, reservation: Reservation, reason: str, outcome: str,
              status: int, refusal: GlanceRefused | None = None) -> None:
        log.error("fill of image %s failed after %s of %s: %s; nothing was cached",
                  fill.image_id, format_size(fill.written), format_size(fill.expected.size),
                  reason)
        if outcome in ("disk_error", "commit_error"):
            self._store.disk_failed(reason)
        fill.failed(FillFailed(reason, outcome, status, refusal))
        self._forget(fill)
        self._store.release(reservation)
        self._store.discard_partial(fill.path)

    def _forget(self, fill: Fill) -> None:
        if self._fills.get(fill.image_id) is fill:
            del self._fills[fill.image_id]
