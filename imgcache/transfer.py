"""Downloading an image body from Glance for a fill, healing broken transfers.

When the connection resets, stalls past the read timeout or Glance answers 5xx, the
transfer is retried (bounded attempts, exponential backoff), rotating through the
configured upstream URLs, and resumed with ``Range: bytes=N-`` from the first byte not yet
received. Glance answers 400 to any Range on rbd, swift and s3 stores: then the image is
downloaded again from byte 0 and the N bytes already received are skipped. Readers see a
pause; the fill's hash still covers every byte once.

A download runs on the credentials of callers Glance allowed (``credentials.AllowedCallers``):
when Glance refuses the current ones (401, 403, 404: a token expired or was revoked before a
resume), it goes on at once with the next caller's; when every one was refused, it fails with
Glance's answer.

With a shared tier (``imgcache.tier``) a fill's download carries a ``SourcePlan``: each attempt
asks it whether to go to a tier node or to Glance. A failure at a tier node moves the download
on to the next source at once (no backoff, no retry spent), resumed where it broke.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from multidict import CIMultiDict

from imgcache.credentials import DATA_REQUEST_HEADERS, AllowedCallers
from imgcache.datafetch import DataResponse
from imgcache.errors import FillError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from imgcache.metrics import Metrics
from imgcache.pieces import Piece
from imgcache.tier import SourcePlan, TierNode
from imgcache.upstream import Upstream, end_to_end_headers

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: Statuses with which Glance refuses the credentials a data GET was sent with.
REFUSALS = frozenset({401, 403, 404})
_MAX_REFUSAL_BYTES = 64 << 10
#: Where a download's pieces go, in order; it holds a piece only until the call returns
#: (``Piece.retain`` to keep it longer).
Feed = Callable[[Piece], Awaitable[None]]
T = TypeVar("T")


class _RangeRefused(Exception):
    """Glance's store cannot serve ranges: download from 0 and skip what we have."""


class _NextSource(Exception):
    """A tier node failed the attempt: the next attempt goes to the next source."""


@dataclass(frozen=True)
class _Source:
    """Where the attempt in progress reads from: its name for messages, how a failure while
    reading its body is translated, and the counter of the bytes it delivered."""

    name: str
    broken: Callable[[BaseException, str], Exception]
    delivered: Any  # a prometheus Counter child


class _CallerRefused(Exception):
    """Glance refused the credentials of the current caller."""

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers
        self.body = body


class GlanceRefused(FillError):
    """Glance refused the credentials of every caller a download had; ``status``,
    ``headers`` and ``body`` are its last answer."""

    def __init__(self, refusal: _CallerRefused) -> None:
        super().__init__(f"Glance refused every allowed caller's credentials "
                         f"(last answer {refusal.status})", "refused")
        self.status = refusal.status
        self.headers = refusal.headers
        self.body = refusal.body


class ResumableDownload:
    """Bytes ``start``..``end`` of an image of ``size`` bytes, fed in order to ``feed``,
    each exactly once."""

    def __init__(self, upstream: Upstream, metrics: Metrics, *, retries: int,
                 backoff: float, plan: SourcePlan | None = None) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self._retries = retries
        self._backoff = backoff
        self._plan = plan  # None: every attempt goes to Glance
        self._glance = _Source("Glance", upstream.broken, metrics.source_bytes.labels("glance"))
        self._source = self._glance
        self.received = 0  # absolute offset in the image of the next byte to feed
        self._end = 0
        self._size = 0

    async def run(self, path_qs: str, callers: AllowedCallers, size: int,
                  feed: Feed, start: int = 0,
                  end: int | None = None) -> None:
        """Download until every byte of the span was fed, with the credentials of
        ``callers``. Raises GlanceRefused (every caller refused), FillError (bad data, or a
        status that retrying cannot change) or UpstreamError (retries exhausted)."""
        self.received, self._end, self._size = start, size if end is None else end, size
        use_range = True
        failures = 0
        while True:
            headers = callers.current()
            assert headers is not None, "a refusal of the last caller ends the download"
            try:
                await self._attempt(path_qs, headers, feed, use_range, failures)
                return
            except _NextSource:
                continue
            except _CallerRefused as refusal:
                if not callers.refused(headers):
                    raise GlanceRefused(refusal) from None
                log.warning("Glance refused one caller's credentials for %s (%d) after %d of "
                            "%d bytes; going on with another allowed caller's", path_qs,
                            refusal.status, self.received, self._end)
            except _RangeRefused:
                log.info("Glance refuses ranges for %s; downloading again from byte 0 and "
                         "skipping the %d bytes already received", path_qs, self.received)
                use_range = False
            except UpstreamError as exc:
                failures += 1
                if failures > self._retries:
                    raise
                delay = self._backoff * 2 ** (failures - 1)
                log.warning("download of %s broke after %d of %d bytes (%s); retry %d of %d "
                            "in %.1fs", path_qs, self.received, self._end, exc, failures,
                            self._retries, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, path_qs: str, caller: CIMultiDict[str],
                       feed: Feed, use_range: bool,
                       rotation: int) -> None:
        node = self._plan.current() if self._plan is not None else None
        if node is None:
            self._source = self._glance
            await self._attempt_at(None, path_qs, caller, feed, use_range, rotation)
            return
        assert self._plan is not None
        self._source = _Source(f"tier node {node.url}", self._plan.broken,
                               self._metrics.source_bytes.labels(node.url))
        offset = self.received
        try:
            await self._attempt_at(node, path_qs, caller, feed, use_range, rotation)
        except Exception as exc:
            if not self._plan.can_fail_over(exc):
                raise
            self._plan.failed(node, exc, path_qs)
            raise _NextSource() from exc
        finally:
            if self.received > offset:
                self._plan.delivered(node)

    async def _attempt_at(self, node: TierNode | None, path_qs: str,
                          caller: CIMultiDict[str], feed: Feed,
                          use_range: bool, rotation: int) -> None:
        offset = self.received
        partial = offset > 0 or self._end < self._size
        ranged = partial and use_range
        headers = CIMultiDict(caller)
        for name in DATA_REQUEST_HEADERS:
            headers.popall(name, None)
        if ranged:
            headers["Range"] = f"bytes={offset}-{self._end - 1}"
        if node is None:
            response = await self._upstream.open_data(path_qs, headers, rotate=rotation)
        else:
            assert self._plan is not None
            response = await self._plan.get(node, path_qs, headers, offset if ranged else 0,
                                            self._end if ranged else self._size, self._size)
        try:
            if response.status in REFUSALS:
                body = await self._read(response.read_all(_MAX_REFUSAL_BYTES))
                if body is None:
                    raise UpstreamError(f"{self._source.name}'s refusal of a data GET is "
                                        f"longer than the {_MAX_REFUSAL_BYTES} bytes expected")
                raise _CallerRefused(response.status, end_to_end_headers(response.headers),
                                     body)
            skip = self._bytes_to_skip(response, offset, ranged)
            if offset:
                self._metrics.fill_resumes.labels("restart" if skip else "range").inc()
            await self._stream(response, skip, feed)
        finally:
            response.release()

    def _bytes_to_skip(self, response: DataResponse, offset: int, ranged: bool) -> int:
        status = response.status
        if ranged and status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise FillError(f"Glance answered a resume from {offset} with Content-Range "
                                f"{response.headers.get('Content-Range')!r}", "upstream_error")
            return 0
        if ranged and status in (400, 416):
            raise _RangeRefused()
        if status == 200:
            return offset
        if status >= 500:
            # Kept as Glance's: a client not answered yet gets a 503 it may retry (Nova's
            # [glance] num_retries does), a 504, or else a 502.
            error = {503: UpstreamUnavailable, 504: UpstreamTimeout}.get(status, UpstreamError)
            raise error(f"Glance answered {status} to the data GET")
        raise FillError(f"Glance answered {status} to the data GET", "upstream_error")

    async def _stream(self, response: DataResponse, skip: int, feed: Feed) -> None:
        """Feed the body's pieces. Only reading from the source counts as the source failing:
        what ``feed`` raises (the disk, a client gone) goes to the caller as it is."""
        while self.received < self._end:
            piece = await self._read(response.next_piece())
            if piece is None:
                raise UpstreamError(f"{self._source.name} ended the body at byte "
                                    f"{self.received}, expected {self._end}")
            try:
                self._metrics.upstream_bytes.inc(len(piece))
                self._source.delivered.inc(len(piece))
                if skip:
                    dropped = min(skip, len(piece))
                    piece.narrow(dropped, len(piece))
                    skip -= dropped
                if self.received + len(piece) > self._end:
                    if self._end == self._size:
                        raise FillError(f"{self._source.name} sent more bytes than Glance's "
                                        "metadata says", "size_mismatch")
                    piece.narrow(0, self._end - self.received)  # a 200 to a range: enough
                if len(piece):
                    await feed(piece)
                    self.received += len(piece)
            finally:
                piece.release()
        if self._end == self._size and await self._read(response.more()):
            raise FillError(f"{self._source.name} sent more bytes than Glance's metadata "
                            "says", "size_mismatch")

    async def _read(self, reading: Awaitable[T]) -> T:
        try:
            return await reading
        except Exception as exc:
            raise self._source.broken(exc, "an image download") from exc
