"""Sending image bytes from files to clients with sendfile(2), under uvloop too.

uvloop has no ``loop.sendfile`` (uvloop issue 228), so aiohttp's FileResponse silently
copies through user space there. This module sends straight from the page cache: the
sendfile calls run on worker threads (they may wait on the disk), and between them the
loop waits for the socket to become writable, watching a dup of its fd because uvloop
refuses watchers on an fd that a transport owns.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from imgcache.fill import Fill, FillFailed

#: Upper bound of one sendfile(2) call; the socket buffer usually bounds it first.
_MAX_SENDFILE = 1 << 30
#: A client whose socket takes no byte for this long is dropped (it stopped reading).
CLIENT_STALL_SECONDS = 300.0
#: How long a thread sending a cached file waits for a full socket to drain before leaving
#: it to the loop. Not for readers of a fill: in a storm, 32 of them polling from worker
#: threads made new clients wait longer for their first byte (p99 - first 0.07 -> 0.19 s
#: in one bench run).
WRITABLE_WAIT_SECONDS = 0.01


class ZeroCopySender:
    """Sends file ranges to aiohttp connections with sendfile(2)."""

    def __init__(self, threads: ThreadPoolExecutor) -> None:
        self._threads = threads

    async def send_file(self, request: web.Request, fd: int, start: int, end: int,
                        size: int, on_sent: Callable[[int], None]) -> bool:
        """Send bytes ``start``..``end`` of a complete cached file of ``size`` bytes, calling
        ``on_sent`` with the count of each piece that left. Raises OSError, before sending
        a byte, if the file no longer has ``size`` bytes. Returns False if the file was
        deleted from the cache directory meanwhile (its bytes were still sent whole)."""
        return await self._send(request, fd, start, end, None, on_sent, size)

    async def send_growing(self, request: web.Request, fd: int, start: int, end: int,
                           fill: Fill, on_sent: Callable[[int], None]) -> None:
        """Send bytes ``start``..``end`` of a file that ``fill`` is still writing, each as
        soon as it is on disk, the last ones only once the fill is verified. Raises
        FillFailed (after sending what was allowed) if the fill fails."""
        await self._send(request, fd, start, end, fill, on_sent, None)

    async def _send(self, request: web.Request, fd: int, start: int, end: int,
                    fill: Fill | None, on_sent: Callable[[int], None],
                    size: int | None) -> bool:
        loop = asyncio.get_running_loop()
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        out_fd = os.dup(sock.fileno())
        linked = True
        try:
            # Bytes aiohttp or uvloop still hold (the headers) must leave before ours.
            while transport.get_write_buffer_size():
                await _writable(loop, out_fd)
            position = start
            while position < end:
                limit = end if fill is None else fill.readable_until(end)
                if limit <= position:
                    assert fill is not None
                    await fill.wait_for_progress()
                    continue
                if fill is not None:
                    sent, blocked = await loop.run_in_executor(
                        self._threads, _send_while_growing, out_fd, fd, position, end, fill)
                elif size is not None:  # the first piece of a cached file: check it first
                    sent, blocked, linked = await loop.run_in_executor(
                        self._threads, _check_then_send, out_fd, fd, position, limit, size)
                    size = None
                else:
                    sent, blocked = await loop.run_in_executor(
                        self._threads, _sendfile_until_blocked, out_fd, fd, position, limit,
                        True)
                position += sent
                on_sent(sent)
                if blocked:
                    await _writable(loop, out_fd)
        finally:
            os.close(out_fd)
        return linked


def _check_then_send(out_fd: int, in_fd: int, start: int, end: int,
                     size: int) -> tuple[int, bool, bool]:
    """Runs on a worker thread: check that the cached file still has its committed size,
    then ``_sendfile_until_blocked``. Also returns whether the file is still linked."""
    status = os.fstat(in_fd)
    if status.st_size != size:
        raise OSError(errno.ESTALE, f"the cached file has {status.st_size} bytes, "
                                    f"{size} were committed")
    return (*_sendfile_until_blocked(out_fd, in_fd, start, end, True), status.st_nlink > 0)


def _send_while_growing(out_fd: int, in_fd: int, start: int, end: int,
                        fill: Fill) -> tuple[int, bool]:
    """Runs on a worker thread: send what ``fill`` allows and go on with what it writes
    meanwhile, until done, caught up, or the socket is full. Returns bytes sent and whether
    the socket would block; a failed fill is raised only once no byte was sent (the caller
    looks again, so that the bytes that left are always counted)."""
    position = start
    while position < end:
        try:
            limit = fill.readable_until(end)
        except FillFailed:
            if position > start:
                break
            raise
        if limit <= position:
            break
        sent, blocked = _sendfile_until_blocked(out_fd, in_fd, position, limit, False)
        position += sent
        if blocked:
            return position - start, True
    return position - start, False


def _sendfile_until_blocked(out_fd: int, in_fd: int, start: int, end: int,
                            wait_writable: bool) -> tuple[int, bool]:
    """Runs on a worker thread: sendfile until done or the socket is full (with
    ``wait_writable``: stays full for WRITABLE_WAIT_SECONDS). Returns bytes sent and
    whether the socket would block."""
    position = start
    while position < end:
        try:
            sent = os.sendfile(out_fd, in_fd, position, min(end - position, _MAX_SENDFILE))
        except BlockingIOError:
            if wait_writable and _writable_soon(out_fd):
                continue
            return position - start, True
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise ConnectionResetError(exc.errno, "client went away") from exc
            raise
        if sent == 0:
            raise OSError(errno.EIO, f"file ended at {position}, expected {end} bytes")
        position += sent
    return position - start, False


def _writable_soon(fd: int) -> bool:
    """Runs on a worker thread: whether the socket takes bytes again within
    WRITABLE_WAIT_SECONDS. A reading client frees its buffer within milliseconds; waiting
    for that here spares the event loop a round trip per buffer-full, and a client that
    stopped reading goes back to the loop, which watches it without holding a thread."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(WRITABLE_WAIT_SECONDS * 1000))


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until ``fd`` (a socket) can take more bytes or has failed."""
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout(CLIENT_STALL_SECONDS):
            await ready
    except TimeoutError:
        raise ConnectionResetError("client stopped reading") from None
    finally:
        loop.remove_writer(fd)
