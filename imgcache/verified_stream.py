"""Image bytes streamed from Glance to one client, verified as a fill is.

When an image is not served from the cache (larger than the cap, no room, the cache disk
failed mid-fill), its bytes come from Glance for this one client, and are hashed on a
thread as they pass. The last HOLD_BACK_BYTES of the response wait until the whole image
matched Glance's size and hash; a mismatch or a download that cannot be healed raises, and
the caller ends the client's connection with a reset, so that no path ends a wrong or short
image cleanly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from imgcache.credentials import AllowedCallers
from imgcache.digest import Expected
from imgcache.errors import FillError
from imgcache.fill import HOLD_BACK_BYTES
from imgcache.keys import data_path
from imgcache.metrics import Metrics
from imgcache.pieces import Piece
from imgcache.sink import HashSink
from imgcache.transfer import ResumableDownload

Send = Callable[[memoryview], Awaitable[None]]


class _HeldTail:
    """Passes bytes on to ``send`` in order, always keeping the last ``hold`` back."""

    def __init__(self, send: Send, hold: int) -> None:
        self._send = send
        self._hold = hold
        self._parts: deque[memoryview] = deque()
        self._held = 0

    async def add(self, piece: memoryview) -> None:
        """Queue ``piece``; send whatever is more than ``hold`` bytes from the end."""
        self._parts.append(piece)
        self._held += len(piece)
        while self._held > self._hold:
            first = self._parts[0]
            excess = self._held - self._hold
            if len(first) <= excess:
                self._parts.popleft()
                self._held -= len(first)
                await self._send(first)
            else:
                self._parts[0] = first[excess:]
                self._held -= excess
                await self._send(first[:excess])

    async def release(self) -> None:
        """Send what was held back (the image was verified)."""
        while self._parts:
            first = self._parts.popleft()
            self._held -= len(first)
            await self._send(first)


class VerifiedStream:
    """One image's bytes from Glance, verified before the last of them is passed on."""

    def __init__(self, download: ResumableDownload, pipeline: Executor,
                 metrics: Metrics, image_id: str, expected: Expected,
                 callers: AllowedCallers) -> None:
        self._download = download
        self._pipeline = pipeline
        self._metrics = metrics
        self._image_id = image_id
        self._expected = expected
        self._callers = callers

    async def run(self, send: Send, *, send_from: int, send_to: int, image_from: int = 0,
                  hasher: Any | None = None) -> None:
        """Download bytes ``image_from``..size (``hasher`` holds bytes 0..``image_from``
        already; None: a fresh one), hash every one, and pass bytes ``send_from``..``send_to``
        to ``send`` in order, the last HOLD_BACK_BYTES only once the whole image matched.
        Raises GlanceRefused, FillError (size or hash mismatch) or UpstreamError, with the
        held tail not sent."""
        expected = self._expected
        if hasher is None:
            hasher = expected.new_hasher()
        sink = HashSink(self._pipeline, hasher) if hasher is not None else None
        tail = _HeldTail(send, HOLD_BACK_BYTES)
        position = image_from

        async def take(chunk: Piece) -> None:
            nonlocal position
            if sink is not None:
                await sink.feed(chunk)
            low, high = max(position, send_from), min(position + len(chunk), send_to)
            if low < high:
                # A copy: the transport may still hold what it was given after the write
                # returned, and the piece's buffer is received into again once released.
                await tail.add(memoryview(chunk.view[low - position:high - position].tobytes()))
            position += len(chunk)

        try:
            await self._download.run(data_path(self._image_id), self._callers, expected.size,
                                     take, start=image_from)
            digest = await sink.finish() if sink is not None else None
        finally:
            if sink is not None:
                await sink.close()
        if position != expected.size:
            raise FillError(f"Glance sent {position} bytes, its metadata says "
                            f"{expected.size}", "size_mismatch")
        if not expected.matches(digest, position):
            self._metrics.checksum_failures.inc()
            raise FillError(f"{expected.algo} of the image streamed from Glance is {digest}, "
                            f"Glance says {expected.value}", "checksum_mismatch")
        await tail.release()
