"""How the stand-in speaks HTTP: Glance's JSON errors, request ids and Range rules, request
bodies streamed in CHUNK pieces, blocking calls sent to threads, and the per-request tally that
the request log (`LoggedRequest`) is made from.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from imgcache.standin.images import CHUNK

_T = TypeVar("_T")


@dataclass
class LoggedRequest:
    """A request the stand-in answered, recorded when its response ended (or broke off)."""

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    status: int
    body_bytes_sent: int
    body_bytes_received: int
    header_items: list[tuple[str, str]] = field(default_factory=list)  # repeated ones too


@dataclass
class Tally:
    """What a handler knows about its own traffic, read by the logging middleware."""

    status: int | None = None
    sent: int = 0
    received: int = 0


TALLY = web.RequestKey("imgcache_standin_tally", Tally)
"""Where a request keeps its `Tally` (set by the logging middleware)."""


async def run_blocking(func: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking call in the loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


async def consume(
    request: web.Request,
    sink: Callable[[bytearray], object],
    tally: Tally,
    executor: concurrent.futures.Executor | None = None,
) -> int:
    """Stream the request body into `sink`, run in `executor`, about CHUNK bytes at a time.

    Returns the body's length. Memory stays at about one CHUNK whatever the body size.
    """
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while data := await request.content.read(CHUNK):
        buf += data
        tally.received += len(data)
        if len(buf) >= CHUNK:
            await loop.run_in_executor(executor, sink, buf)
            buf = bytearray()  # a cancelled await may leave the old one in the sink's hands
    if buf:
        await loop.run_in_executor(executor, sink, buf)
    return tally.received


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Give every response an ``x-openstack-request-id``, as Glance's middleware does."""
    response.headers.setdefault("x-openstack-request-id", f"req-{uuid.uuid4()}")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Build a Keystone/Glance-style JSON error response."""
    title = web.Response(status=status).reason
    body = {"error": {"code": status, "title": title, "message": message}}
    return web.json_response(body, status=status, headers=headers)


class Reject(Exception):
    """Raised by a handler to answer at once with `response` (an error)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def parse_range(header: str, size: int) -> tuple[int, int]:
    """Return the inclusive (first, last) byte of a Range header, with Glance's rules.

    Several ranges give 400; a malformed range or a first byte at or past `size` gives 416;
    a last byte past the end is clamped; a suffix `bytes=-N` is the last N bytes.
    """
    if "," in header:
        raise Reject(error(400, "Multiple ranges are not supported."))
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header, re.IGNORECASE)
    unsatisfiable = Reject(error(416, "Invalid Range header."))
    if match is None or match.group(1) == match.group(2) == "":
        raise unsatisfiable
    if match.group(1) == "":  # suffix: the last N bytes
        length = int(match.group(2))
        if length == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - length), size - 1
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if last < first or first >= size:
        raise unsatisfiable
    return first, min(last, size - 1)
