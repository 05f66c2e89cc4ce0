"""Sending image bytes from files to clients, under uvloop too, and ending failed
responses with a reset.

uvloop has no ``loop.sendfile`` (uvloop issue 228), so aiohttp's FileResponse silently
copies through user space there. This module sends on worker threads (they may wait on the
disk), and between their calls the loop waits for the socket to become writable, watching a
dup of its fd because uvloop refuses watchers on an fd that a transport owns.

Two sources: a committed cache file (``send_file``: sendfile(2) from the page cache, hits go
out zero-copy) and a file a fill is still writing (``send_growing``: copies from a window of
``mapped_windows`` shared by the fill's readers where the fill has finished writing one,
else sendfile; that module says why). Every call on a worker thread sends at most
MAX_BYTES_PER_CALL and waits at most WRITABLE_WAIT_SECONDS for a slow client, so that
multi-GB sends and slow clients never hold every thread for long while a small hit waits
for one; a call that reads the disk (a file not in the page cache) holds its thread while
the disk answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from imgcache.fill import Fill, FillFailed
from imgcache.loopthreads import LoopThreads
from imgcache.mapped_windows import HOW_SENT, MappedWindows, Window
from imgcache.metrics import Metrics

#: Most bytes one call on a sending thread sends before it hands the thread back: about
#: 3 ms at page-cache speed, so a thread is free again within milliseconds however big the
#: image (without a bound, a fast client's 256 MiB hit held its thread for the whole send).
MAX_BYTES_PER_CALL = 4 << 20
#: A client whose socket takes no byte for this long is dropped (it stopped reading).
CLIENT_STALL_SECONDS = 300.0
#: How long one call sending a cached file goes on, once its client's socket first filled,
#: waiting for it to drain before it leaves the socket to the loop and hands its thread
#: back: a client that reads steadily but slowly would otherwise keep a thread for a whole
#: MAX_BYTES_PER_CALL, and there are only app.FILE_THREADS of them. Not for readers of a
#: fill: in a storm, 32 of them polling from worker threads made new clients wait longer
#: for their first byte (p99 - first 0.07 -> 0.19 s in one bench run, with 32 threads).
WRITABLE_WAIT_SECONDS = 0.01

T = TypeVar("T")
#: Errors of a write to a client that mean it went away.
_CLIENT_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})

#: What sending to a client that went away raises: ConnectionResetError from the senders
#: here, and a plain ConnectionError ("Connection lost") from aiohttp when the client reset
#: while a write waited for its socket.
ClientGone = ConnectionError


def reset_connection(request: web.Request) -> None:
    """End the client's connection with a TCP reset (SO_LINGER 0, then close), never a
    clean FIN: a client that does not count bytes against Content-Length must not take a
    short or unverified body for a whole one. Bytes not yet sent are discarded."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FileSender:
    """Sends file ranges to aiohttp connections on its own threads: with sendfile(2), and
    to the readers of fills from the windows of their files they share."""

    def __init__(self, threads: LoopThreads, metrics: Metrics) -> None:
        self._threads = threads
        self._windows = MappedWindows()
        self._fill_reader_bytes = {how: metrics.fill_reader_bytes.labels(how)
                                   for how in HOW_SENT}

    @property
    def mapped_bytes(self) -> int:
        """Bytes of image files mapped now for the readers of fills."""
        return self._windows.mapped_bytes

    async def send_file(self, request: web.Request, fd: int, start: int, end: int,
                        size: int, on_sent: Callable[[int], None]) -> bool:
        """Send bytes ``start``..``end`` of a complete cached file of ``size`` bytes, calling
        ``on_sent`` with the count of each piece that left. Raises OSError, before sending
        a byte, if the file no longer has ``size`` bytes. Returns False if the file was
        deleted from the cache directory meanwhile (its bytes were still sent whole)."""
        loop = asyncio.get_running_loop()
        async with _ClientSocket(request) as out_fd:
            sent, blocked, linked = await self.run_on_thread(
                _check_then_send, out_fd, fd, start, end, size)
            position = start + sent
            on_sent(sent)
            while position < end:
                if blocked:
                    await _writable(loop, out_fd)
                sent, blocked = await self.run_on_thread(
                    _sendfile_until_blocked, out_fd, fd, position, end, True)
                position += sent
                on_sent(sent)
        return linked

    async def send_growing(self, request: web.Request, fd: int, start: int, end: int,
                           fill: Fill, on_sent: Callable[[int], None]) -> None:
        """Send bytes ``start``..``end`` of a file that ``fill`` is still writing, each as
        soon as it is on disk, the last ones only once the fill is verified. Raises
        FillFailed (after sending what was allowed) if the fill fails."""
        loop = asyncio.get_running_loop()
        async with _ClientSocket(request) as out_fd:
            position = start
            while position < end:
                if fill.readable_until(end) <= position:
                    await fill.wait_for_progress()
                    continue
                sent, blocked = await self.run_on_thread(
                    self._send_while_growing, out_fd, fd, position, end, fill)
                position += sent
                on_sent(sent)
                if blocked:
                    await _writable(loop, out_fd)

    def _send_while_growing(self, out_fd: int, in_fd: int, start: int, end: int,
                            fill: Fill) -> tuple[int, bool]:
        """Runs on a worker thread: send what ``fill`` allows and go on with what it writes
        meanwhile, until done, caught up, the socket is full or MAX_BYTES_PER_CALL went out;
        from the shared window holding the next byte when the fill has finished writing it,
        else with sendfile. A window is held only while this call sends from it: a reader
        waiting for its client or for the fill holds none. Returns bytes sent and whether the
        socket would block; a failed fill is raised only once no byte was sent (the caller
        looks again, so that the bytes that left are always counted)."""
        position = start
        budget_end = min(end, start + MAX_BYTES_PER_CALL)
        while position < budget_end:
            try:
                limit = min(fill.readable_until(end), budget_end)
            except FillFailed:
                if position > start:
                    break
                raise
            if limit <= position:
                break
            window, how = self._windows.hold(fill, in_fd, position, fill.written,
                                             fill.expected.size)
            if window is None:
                sent, blocked = _sendfile_until_blocked(out_fd, in_fd, position, limit, False)
            else:
                try:
                    sent, blocked = _write_until_blocked(out_fd, window, position,
                                                         min(limit, window.end))
                finally:
                    self._windows.drop(window)
            self._fill_reader_bytes[how].inc(sent)
            position += sent
            if blocked:
                return position - start, True
        return position - start, False

    async def run_on_thread(self, func: Callable[..., T], *args: object) -> T:
        """Run one sending step on a sending thread, to completion (see
        ``LoopThreads.run``)."""
        return await self._threads.run(func, *args)


class _ClientSocket:
    """A dup of the client connection's socket fd, for sendfile and writability watches;
    entered once the bytes aiohttp or uvloop still hold (the headers) have left."""

    def __init__(self, request: web.Request) -> None:
        self._transport = request.transport
        self._fd = -1

    async def __aenter__(self) -> int:
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        self._fd = os.dup(sock.fileno())
        try:
            loop = asyncio.get_running_loop()
            while transport.get_write_buffer_size():
                await _writable(loop, self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        return self._fd

    async def __aexit__(self, *exc: object) -> None:
        os.close(self._fd)


def _check_then_send(out_fd: int, in_fd: int, start: int, end: int,
                     size: int) -> tuple[int, bool, bool]:
    """Runs on a worker thread: check that the cached file still has its committed size,
    then ``_sendfile_until_blocked``. Also returns whether the file is still linked."""
    status = os.fstat(in_fd)
    if status.st_size != size:
        raise OSError(errno.ESTALE, f"the cached file has {status.st_size} bytes, "
                                    f"{size} were committed")
    return (*_sendfile_until_blocked(out_fd, in_fd, start, end, True), status.st_nlink > 0)


def _write_until_blocked(out_fd: int, window: Window, start: int,
                         end: int) -> tuple[int, bool]:
    """Runs on a worker thread: write bytes ``start``..``end`` of the file from ``window``
    until done or the socket is full. Returns bytes sent and whether the socket would
    block. Raises OSError (EIO) when a page of the window cannot be read."""
    position = start
    while position < end:
        try:
            position += os.write(out_fd, window.view[position - window.start:
                                                     end - window.start])
            continue
        except BlockingIOError:
            return position - start, True
        except OSError as exc:
            error = exc.errno
        # Raised out here, the failed write's exception gone with the except clause: nothing
        # (a tracer's frames) may keep a slice of the window alive past its unmapping.
        if error in _CLIENT_GONE:
            raise ConnectionResetError(error, "client went away")
        if error == errno.EFAULT:
            raise OSError(errno.EIO, f"bytes {position}..{end} of the file cannot be read "
                                     "(truncated under its readers, or a disk error)")
        raise OSError(error, os.strerror(error) if error else "write failed")
    return position - start, False


def _sendfile_until_blocked(out_fd: int, in_fd: int, start: int, end: int,
                            wait_writable: bool) -> tuple[int, bool]:
    """Runs on a worker thread: sendfile until done, MAX_BYTES_PER_CALL sent, or the socket
    is full (with ``wait_writable``: still full WRITABLE_WAIT_SECONDS after it first
    filled in this call). Returns bytes sent and whether the socket would block."""
    position = start
    end = min(end, start + MAX_BYTES_PER_CALL)
    deadline = None
    while position < end:
        try:
            sent = os.sendfile(out_fd, in_fd, position, end - position)
        except BlockingIOError:
            if wait_writable:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + WRITABLE_WAIT_SECONDS
                if now < deadline and _writable_within(out_fd, deadline - now):
                    continue
            return position - start, True
        except OSError as exc:
            if exc.errno in _CLIENT_GONE:
                raise ConnectionResetError(exc.errno, "client went away") from exc
            raise
        if sent == 0:
            raise OSError(errno.EIO, f"file ended at {position}, expected {end} bytes")
        position += sent
    return position - start, False


def _writable_within(fd: int, seconds: float) -> bool:
    """Runs on a worker thread: whether the socket takes bytes again within ``seconds``. A
    reading client frees its buffer within milliseconds; waiting for that here spares the
    event loop a round trip per buffer-full, and a client that stopped reading goes back to
    the loop, which watches it without holding a thread."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(math.ceil(seconds * 1000)))


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
