"""Downloading an image body from Glance for a fill, healing broken transfers.

When the connection resets, stalls past the read timeout or Glance answers 5xx, the
transfer is retried (bounded attempts, exponential backoff), rotating through the
configured upstream URLs, and resumed with ``Range: bytes=N-`` from the first byte not yet
received. Glance answers 400 to any Range on rbd, swift and s3 stores: then the image is
downloaded again from byte 0 and the N bytes already received are skipped. Readers see a
pause; the fill's hash still covers every byte once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

from imgcache.errors import FillError, UpstreamError
from imgcache.metrics import Metrics
from imgcache.upstream import Upstream

log = logging.getLogger(__name__)

#: Largest piece read from Glance at once (smaller when bytes arrive slowly).
READ_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _RangeRefused(Exception):
    """Glance's store cannot serve ranges: download from 0 and skip what we have."""


class ResumableDownload:
    """One image body, fed in order to ``feed``, exactly ``size`` bytes once."""

    def __init__(self, upstream: Upstream, metrics: Metrics, *, retries: int,
                 backoff: float) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self._retries = retries
        self._backoff = backoff
        self.received = 0

    async def run(self, path_qs: str, headers: Mapping[str, str], size: int,
                  feed: Callable[[bytes], Awaitable[None]]) -> None:
        """Download until ``size`` bytes were fed. Raises FillError (bad data, or a status
        that retrying cannot change) or UpstreamError (retries exhausted)."""
        base = {k: v for k, v in headers.items() if k.lower() not in ("range", "if-range")}
        use_range = True
        failures = 0
        while True:
            try:
                await self._attempt(path_qs, base, size, feed, use_range, failures)
                return
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
                            "in %.1fs", path_qs, self.received, size, exc, failures,
                            self._retries, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, path_qs: str, base: dict[str, str], size: int,
                       feed: Callable[[bytes], Awaitable[None]], use_range: bool,
                       rotation: int) -> None:
        offset = self.received
        headers = dict(base)
        if offset and use_range:
            headers["Range"] = f"bytes={offset}-"
        response = await self._upstream.request("GET", path_qs, headers, rotate=rotation)
        try:
            skip = self._bytes_to_skip(response, offset, use_range)
            if offset:
                self._metrics.fill_resumes.labels("restart" if skip else "range").inc()
            await self._stream(response, size, skip, feed)
        finally:
            response.release()

    def _bytes_to_skip(self, response: aiohttp.ClientResponse, offset: int,
                       use_range: bool) -> int:
        status = response.status
        if offset and use_range and status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise FillError(f"Glance answered a resume from {offset} with Content-Range "
                                f"{response.headers.get('Content-Range')!r}", "upstream_error")
            return 0
        if offset and use_range and status in (400, 416):
            raise _RangeRefused()
        if status == 200:
            return offset
        if status >= 500:
            raise UpstreamError(f"Glance answered {status} to the data GET")
        raise FillError(f"Glance answered {status} to the data GET", "upstream_error")

    async def _stream(self, response: aiohttp.ClientResponse, size: int, skip: int,
                      feed: Callable[[bytes], Awaitable[None]]) -> None:
        try:
            while chunk := await response.content.read(READ_CHUNK):
                self._metrics.upstream_bytes.inc(len(chunk))
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                    if not chunk:
                        continue
                if self.received + len(chunk) > size:
                    raise FillError("Glance sent more bytes than its metadata says",
                                    "size_mismatch")
                self.received += len(chunk)
                await feed(chunk)
        except FillError:
            raise
        except Exception as exc:
            raise self._upstream.broken(exc, "an image download") from exc
        if self.received < size:
            raise UpstreamError(f"Glance ended the body after {self.received} of {size} bytes")
