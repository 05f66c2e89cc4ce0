"""Fault knobs for failures a real Glance cannot be made to produce on demand, and the
image-data sender that applies them: error statuses, corrupt bytes, connection resets,
stalls, trickling, no Range support.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from aiohttp import web

from imgcache.standin.images import CHUNK
from imgcache.standin.wire import Tally, run_blocking


@dataclass
class Fault:
    """Knobs applied to image-data GETs of one image (set through `GlanceStandin.faults`).

    Offsets count body bytes of the response, except `corrupt_at`, which is an offset in the
    image (so a ranged GET that covers it gets the same bad byte as a full one).
    """

    status: int | None = None  # answer the data GET with this status and a small body
    corrupt_at: int | None = None  # flip one byte at this image offset (right length)
    reset_at: int | None = None  # abort the connection after this many body bytes
    stall_at: int | None = None  # after this many body bytes, pause for stall_seconds
    stall_seconds: float = 0.0
    rate: int | None = None  # trickle: body bytes per second
    first_byte_delay: float = 0.0  # wait before sending headers
    times: int | None = None  # apply to this many data GETs only, then clear (None = always)
    skip: int = 0  # leave this many data GETs alone before the fault applies
    ranges_supported: bool = True  # False: 400 to any Range header (like rbd/swift/s3 stores)
    ignore_range: bool = False  # True: answer a Range with the whole image (200)
    checks_too: bool = False  # also apply to one-byte download checks (left alone by default)
    chunked: bool = False  # send the body with chunked transfer-coding, no Content-Length


def take_fault(faults: dict[str, Fault], image_id: str, is_check: bool = False) -> Fault:
    """Return the fault of `faults` for one data GET of `image_id`, counting down its
    `skip`, then its `times` (dropping it when they run out); download checks are left
    alone unless the fault says `checks_too`."""
    fault = faults.get(image_id)
    if fault is None or (is_check and not fault.checks_too):
        return Fault()
    if fault.skip > 0:
        fault.skip -= 1
        return Fault()
    if fault.times is not None:
        if fault.times <= 0:
            faults.pop(image_id, None)
            return Fault()
        fault.times -= 1
        if fault.times == 0:
            faults.pop(image_id, None)
    return fault


async def send_range(
    request: web.Request,
    response: web.StreamResponse,
    fd: int,
    first: int,
    last: int,
    fault: Fault,
    tally: Tally,
) -> bool:
    """Send image bytes first..last from `fd`, applying `fault`; False if it aborted."""
    loop = asyncio.get_running_loop()
    length = last - first + 1
    step = min(CHUNK, max(1, fault.rate // 20)) if fault.rate else CHUNK
    began = loop.time()
    stalled = False
    while True:
        sent = tally.sent
        if fault.reset_at is not None and sent >= fault.reset_at:
            await abort(request)
            return False
        if fault.stall_at is not None and not stalled and sent >= fault.stall_at:
            stalled = True
            await asyncio.sleep(fault.stall_seconds)
        if sent >= length:
            return True
        limits = [step, length - sent]
        limits += [
            x - sent for x in (fault.reset_at, fault.stall_at) if x is not None and x > sent
        ]
        chunk = await run_blocking(os.pread, fd, min(limits), first + sent)
        if not chunk:  # the file is shorter than the image's size: break off
            await abort(request)
            return False
        corrupt = fault.corrupt_at
        if corrupt is not None and first + sent <= corrupt < first + sent + len(chunk):
            flipped = bytearray(chunk)
            flipped[corrupt - first - sent] ^= 0xFF
            chunk = bytes(flipped)
        await response.write(chunk)
        tally.sent += len(chunk)
        if fault.rate:
            ahead = tally.sent / fault.rate - (loop.time() - began)
            if ahead > 0:
                await asyncio.sleep(ahead)


async def abort(request: web.Request) -> None:
    """Abort the connection once the bytes already written have left (waits at most 1 s).

    Waiting first makes a reset happen at a known byte count rather than wherever the
    transport's buffer happened to be.
    """
    transport = request.transport
    if transport is None:
        return
    for _ in range(200):
        if transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.005)
    transport.abort()
