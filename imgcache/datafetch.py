"""Image-data GETs on connections of their own, their bodies received straight into reused
buffers: the fast lane of a fill (``upstream.Upstream.open_data`` sends every image-data
download this way; everything else goes through aiohttp).

Why not aiohttp's client here: it copies every piece of a body twice on its way in (uvloop
makes a bytes object of each read, its parser another of the body part), and re-arms a read
timer for each piece; at the hash bound of a cold miss that was most of the event loop's
time. Here the response head is parsed by httptools (llhttp, the parser of Node.js), and
a body with a Content-Length, or one that ends with the connection, is received with
``recv_into`` into the buffers of a ``pieces.PiecePool`` (asyncio's BufferedProtocol, which
uvloop supports for TCP and for its TLS transport alike) and handed on as ``Piece`` objects
of at least EMIT_BYTES, or whatever arrived within FLUSH_SECONDS. A chunked body goes
through the parser, which hands its pieces over as bytes. One timer per connection watches
for silence (``read_timeout``), re-armed only when it fires.

Paths: straight to Glance over http or https (CA bundle, client certificate: the caller's
SSLContext), or through an HTTP forward proxy: absolute-form requests for http URLs, a
CONNECT tunnel for https ones (TLS to Glance inside it). One connection per download,
closed after its body ("Connection: close").
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from imgcache.pieces import Buffer, Piece, PiecePool

#: Size of each receive buffer, and how many one download may hold (its memory bound).
BUFFER_BYTES = 1 << 20
POOL_BUFFERS = 16
#: Reading paused for want of a free buffer resumes once this share of the pool is free
#: again. A reader may hold the pieces of the rest while it waits for the next one; one
#: holding more only gets it after a read_timeout (the watchdog then wants one buffer).
RESUME_SHARE = 0.5
#: A buffer with less room than this left is done with: the next read goes to a new one.
MIN_READ_BYTES = 64 << 10
#: A piece is handed on once this many bytes arrived, or FLUSH_SECONDS after its first one.
EMIT_BYTES = 256 << 10
FLUSH_SECONDS = 0.005
#: Buffer of response heads and chunked bodies (parsed by httptools); bound of a head.
PARSE_BUFFER_BYTES = 256 << 10
MAX_HEAD_BYTES = 1 << 20
#: A chunked body's parsed pieces waiting for their reader: reading pauses above this.
CHUNKED_QUEUE_BYTES = POOL_BUFFERS * BUFFER_BYTES
#: Reads that come while no pool buffer is free (should not happen) go here, then are copied.
_SPARE_BYTES = 64 << 10


class ConnectFailed(Exception):
    """The TCP connection to Glance, or to the proxy (``via_proxy``), failed."""

    def __init__(self, os_error: OSError, via_proxy: bool) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error
        self.via_proxy = via_proxy


class ConnectTimedOut(Exception):
    """Connecting (TCP, proxy tunnel, TLS handshake) took longer than connect_timeout."""


class TunnelRefused(Exception):
    """The proxy answered the CONNECT with ``status``, not 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the proxy answered {status} to CONNECT")
        self.status = status


class Disconnected(ConnectionError):
    """The connection ended before the answer did."""


class BadAnswer(Exception):
    """What came back is not an HTTP/1.x answer httptools can parse."""


class DataClient:
    """Opens image-data GETs: ``get(url, headers)``."""

    def __init__(self, *, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None, proxy: str | None = None) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ssl = ssl_context
        self._proxy = urlsplit(proxy) if proxy else None

    async def get(self, url: str, headers: Mapping[str, str]) -> DataResponse:
        """Send ``GET url`` with ``headers`` (end-to-end headers only; Host and Connection are
        set here) and return once the answer's head is in; the caller must ``release`` it.
        Raises ConnectFailed, ConnectTimedOut, TunnelRefused, ssl.SSLError (the handshake or
        the certificate), TimeoutError (no answer within read_timeout), Disconnected,
        BadAnswer; ValueError for a header that cannot be sent."""
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        authority = parts.netloc.rpartition("@")[2]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = _request_head(target if self._proxy is None or https else url.split("#")[0],
                             authority, headers)
        loop = asyncio.get_running_loop()
        connection = _Connection(loop, self._read_timeout)
        try:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._connect(connection, host, port, https)
            except TimeoutError:
                raise ConnectTimedOut() from None
            await connection.exchange(head)
        except BaseException:
            connection.close()
            raise
        return DataResponse(connection)

    async def _connect(self, connection: _Connection, host: str, port: int,
                       https: bool) -> None:
        loop = asyncio.get_running_loop()
        context = self._context() if https else None
        proxy = self._proxy
        if proxy is None:
            try:
                await loop.create_connection(lambda: connection, host, port, ssl=context,
                                             server_hostname=host if https else None)
            except ssl.SSLError:
                raise
            except OSError as exc:
                raise ConnectFailed(exc, via_proxy=False) from exc
            return
        try:
            await loop.create_connection(lambda: connection, proxy.hostname or "",
                                         proxy.port or 80)
        except OSError as exc:
            raise ConnectFailed(exc, via_proxy=True) from exc
        if context is None:
            return
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # RFC 9110 9.3.6
        connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        status = await connection.exchange(connect, tunnel=True)
        if status != 200:
            raise TunnelRefused(status)
        await connection.start_tls(context, host)

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl


def _request_head(target: str, authority: str, headers: Mapping[str, str]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {authority}"]
    for name, value in headers.items():
        if any(c in name for c in "\r\n\0:") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name[:64]!r} holds a character HTTP cannot carry")
        lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class DataResponse:
    """An answer whose head arrived: ``status``, ``headers``, ``content_length``; its body
    through ``next_piece`` (or ``read_all`` for a small one). ``release`` closes it."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = connection.status
        self.reason = connection.reason
        self.headers = connection.headers
        self.content_length = connection.content_length

    async def next_piece(self) -> Piece | None:
        """The next piece of the body (its holder releases it), or None at its end; a caller
        holding more than (1 - RESUME_SHARE) of the pool's buffers meanwhile waits up to a
        read_timeout for it. Raises TimeoutError after read_timeout of silence, Disconnected
        or BadAnswer when the body breaks off or cannot be parsed."""
        return await self._connection.next_piece()

    async def more(self) -> bool:
        """Whether the body holds bytes beyond those taken so far (waits for its end)."""
        piece = await self.next_piece()
        if piece is None:
            return False
        piece.release()
        return True

    async def read_all(self, limit: int) -> bytes | None:
        """The whole body, or None if it is longer than ``limit`` bytes."""
        if self.content_length is not None and self.content_length > limit:
            return None
        body = bytearray()
        while (piece := await self.next_piece()) is not None:
            body += piece.view
            piece.release()
            if len(body) > limit:
                return None
        return bytes(body)

    def release(self) -> None:
        """Close the connection and give back what is still buffered."""
        self._connection.close()


class _Connection(asyncio.BufferedProtocol):
    """One connection: the answer's head parsed, its body received into pool buffers (or
    parsed, when chunked), pieces queued for the one reader of ``next_piece``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = loop.time()
        self._watchdog: asyncio.TimerHandle | None = None
        self._paused = False
        # the head, and chunked bodies
        self._parse_buffer = memoryview(bytearray(PARSE_BUFFER_BYTES))
        self._parser: httptools.HttpResponseParser | None = None
        self._head_bytes = 0
        self._head_done = False
        self._tunnel = False
        self._header_pairs: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        # the body
        self._raw = False  # the body is received into pool buffers, counted, not parsed
        self._remaining: int | None = None  # bytes of the body still to come (None: to EOF)
        self._ended = False  # every byte of the body arrived
        self._ready: deque[Piece] = deque()
        self._queued = 0  # bytes of a chunked body's pieces in _ready
        self._pool = PiecePool(BUFFER_BYTES, POOL_BUFFERS, self._freed_on_any_thread)
        self._buffer: Buffer | None = None
        self._filled = 0  # bytes of the current buffer received
        self._handed = 0  # bytes of the current buffer already in pieces
        self._pending_since = 0.0
        self._flusher: asyncio.TimerHandle | None = None
        self._spare = memoryview(bytearray(_SPARE_BYTES))

    # -- set-up (the client) ----------------------------------------------------------------

    async def exchange(self, head: bytes, tunnel: bool = False) -> int:
        """Send a request ``head`` and wait for the head of its answer; return its status.
        ``tunnel``: a CONNECT, whose answer has no body. Silence longer than read_timeout
        fails the connection (TimeoutError), now and while the body is read."""
        if self._transport is None or self._closed:
            raise Disconnected("the connection is closed")
        self._parser = httptools.HttpResponseParser(self)
        self._tunnel = tunnel
        self._head_done = False
        self._head_bytes = 0
        self._header_pairs = []
        self._transport.write(head)
        if self._watchdog is None:
            self._last_read = self._loop.time()
            self._arm_watchdog()
        await self._wait_head()
        if tunnel and self._error is not None:
            raise self._error
        return self.status

    async def start_tls(self, context: ssl.SSLContext, host: str) -> None:
        """Speak TLS with Glance inside the tunnel."""
        assert self._transport is not None
        self._transport = await self._loop.start_tls(  # type: ignore[assignment]
            self._transport, self, context, server_hostname=host)

    async def _wait_head(self) -> None:
        while not self._head_done:
            await self._wait()

    # -- the body (its reader) ---------------------------------------------------------------

    async def next_piece(self) -> Piece | None:
        """See DataResponse.next_piece."""
        while True:
            if self._ready:
                piece = self._ready.popleft()
                if not self._raw:
                    self._taken_parsed(len(piece))
                return piece
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            await self._wait()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise Disconnected("the connection is closed")
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Close the connection (aborted unless the body ended) and give buffers back."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        while self._ready:
            self._ready.popleft().release()
        if self._buffer is not None:
            self._pool.drop(self._buffer)
            self._buffer = None
        self._pool.close()
        self._parser = None  # it refers back to this protocol
        if self._transport is not None and not self._closed:
            if self._ended:
                self._transport.close()
            else:
                self._transport.abort()
        self._closed = True

    # -- asyncio protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The TCP connection is up."""
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next read goes: the free room of the current pool buffer for a raw
        body, else the parse buffer."""
        if not self._raw:
            return self._parse_buffer
        if self._buffer is None or self._filled == BUFFER_BYTES:
            return self._spare
        return self._buffer.view[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the buffer ``get_buffer`` gave."""
        self._last_read = self._loop.time()
        if not self._raw:
            self._parse(self._parse_buffer[:nbytes])
        elif self._buffer is None:
            self._received_spare(nbytes)
        else:
            self._received_raw(nbytes)

    def eof_received(self) -> bool | None:
        """Glance (or the proxy) ended its side: the end of a body that runs to the close,
        else a body or head cut short."""
        if self._raw and self._remaining is None and not self._ended:
            self._end_body()
        elif not self._ended:
            self._fail(Disconnected(self._cut_short()))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone. Never the end of a body: that is ``eof_received`` (a
        FIN, or TLS's close_notify); a TLS connection cut without close_notify comes here."""
        if not self._ended and self._error is None:
            error = Disconnected(self._cut_short() + (f" ({exc})" if exc else ""))
            error.__cause__ = exc
            self._fail(error)
        self._closed = True
        self._wake()

    def _cut_short(self) -> str:
        if not self._head_done:
            return "the connection closed before the answer's head"
        return f"the connection closed with {self._remaining} bytes of the body missing"

    # -- httptools callbacks -------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        """The status line's reason."""
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header of the head (a chunked body's trailer fields are ignored: nothing
        reads them, and they would not be bounded by MAX_HEAD_BYTES)."""
        if not self._head_done:
            self._header_pairs.append((name, value))

    def on_headers_complete(self) -> None:
        """The head is in: choose how the body is read."""
        if self._head_done or self._parser is None:
            return  # what follows our answer is not ours to read
        status = self._parser.get_status_code()
        if 100 <= status < 200 and not self._tunnel:
            self._header_pairs = []  # an interim answer: the real one follows
            return
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in self._header_pairs)
        self.status, self.headers = status, headers
        self._head_done = True
        if self._tunnel:
            return
        length = headers.get("Content-Length", "").strip(" \t")
        self.content_length = int(length) if length.isdigit() else None
        # Every Transfer-Encoding field counts; the body is chunked when the last coding is.
        codings = [coding.strip().lower() for field in headers.getall("Transfer-Encoding", [])
                   for coding in field.split(",") if coding.strip()]
        chunked = bool(codings) and codings[-1] == "chunked"
        if status in (204, 304):
            self._remaining = 0
        elif not chunked:
            self._remaining = self.content_length  # None: the body runs to the close
            self._raw = True

    def on_body(self, body: bytes) -> None:
        """Body bytes parsed: the start of a raw body, or a chunked body's."""
        if self._tunnel:
            raise BadAnswer("the proxy sent bytes after its answer to CONNECT")
        if self._ended:
            return
        if self._raw and self._remaining is not None:
            body = body[:self._remaining]
            self._remaining -= len(body)
        if body:
            self._ready.append(Piece.of(body))
            if not self._raw:
                self._queued += len(body)
                if self._queued > CHUNKED_QUEUE_BYTES and not self._paused:
                    # Nobody is taking them (a slow client of a stream through): wait.
                    self._paused = True
                    if self._transport is not None:
                        self._transport.pause_reading()

    def on_message_complete(self) -> None:
        """The parser saw the end of the answer."""
        if self._head_done and not self._tunnel:
            self._ended = True

    # -- receiving -----------------------------------------------------------------------------

    def _parse(self, data: memoryview) -> None:
        parser = self._parser
        if parser is None:
            return  # a tunnel's answer was parsed; nothing is expected before TLS
        if not self._head_done:
            self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._raw or self._remaining != 0:
                self._fail(BadAnswer(f"cannot parse Glance's answer: {exc}"))
                return
            # What follows a whole raw body is not ours to read.
        if self._tunnel and self._head_done:
            self._parser = None
        elif self._raw:
            # The head is in: from here the body is counted, not parsed.
            self._parser = None
            if self._remaining == 0:
                self._end_body()
            else:
                self._next_buffer()
        elif self._head_bytes > MAX_HEAD_BYTES and not self._head_done:
            self._fail(BadAnswer(f"the answer's head is longer than {MAX_HEAD_BYTES} bytes"))
        if self._ready or self._ended or self._head_done:
            self._wake()

    def _received_raw(self, nbytes: int) -> None:
        if self._remaining is not None:
            nbytes = min(nbytes, self._remaining)
            self._remaining -= nbytes
        if self._filled == self._handed:
            self._pending_since = self._last_read
        self._filled += nbytes
        if self._remaining == 0:
            self._end_body()
            return
        pending = self._filled - self._handed
        if BUFFER_BYTES - self._filled < MIN_READ_BYTES:
            self._hand_on()
            self._pool.drop(self._buffer)  # type: ignore[arg-type]
            self._buffer = None
            self._next_buffer()
        elif pending >= EMIT_BYTES:
            self._hand_on()
        elif self._flusher is None:
            self._flusher = self._loop.call_at(self._pending_since + FLUSH_SECONDS,
                                               self._flush)

    def _received_spare(self, nbytes: int) -> None:
        if self._remaining is not None:
            nbytes = min(nbytes, self._remaining)
            self._remaining -= nbytes
        self._ready.append(Piece.of(bytes(self._spare[:nbytes])))
        self._wake()
        if self._remaining == 0:
            self._end_body()

    def _hand_on(self) -> None:
        """Queue the bytes of the current buffer not yet in a piece as one piece."""
        if self._buffer is not None and self._filled > self._handed:
            self._ready.append(self._pool.piece(self._buffer, self._handed, self._filled))
            self._handed = self._filled
            self._wake()

    def _flush(self) -> None:
        self._flusher = None
        if self._buffer is None or self._filled == self._handed:
            return
        due = self._pending_since + FLUSH_SECONDS
        if self._loop.time() < due:
            self._flusher = self._loop.call_at(due, self._flush)
        else:
            self._hand_on()

    def _end_body(self) -> None:
        self._hand_on()
        self._ended = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._wake()

    def _next_buffer(self, want: int | None = None) -> bool:
        """Receive into a free buffer from now on; when none is, stop reading until ``want``
        buffers are free (by default RESUME_SHARE of the pool: the threads behind are the
        bound). Returns whether reading goes on."""
        if want is None:
            want = max(1, int(POOL_BUFFERS * RESUME_SHARE))
        buffer = self._pool.take_or_want(want)
        if buffer is None:
            if not self._paused:
                self._paused = True
                if self._transport is not None:
                    self._transport.pause_reading()
            return False
        self._buffer, self._filled, self._handed = buffer, 0, 0
        if self._paused:
            self._paused = False
            self._last_read = self._loop.time()  # waiting on our own threads is not silence
            if self._transport is not None:
                self._transport.resume_reading()
        return True

    def _taken_parsed(self, count: int) -> None:
        """The reader took ``count`` bytes of a chunked body: read on below half the bound."""
        self._queued -= count
        if self._paused and self._queued <= CHUNKED_QUEUE_BYTES // 2 and not self._closed:
            self._paused = False
            self._last_read = self._loop.time()  # waiting on our reader is not silence
            if self._transport is not None:
                self._transport.resume_reading()

    def _freed_on_any_thread(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to resume
            self._loop.call_soon_threadsafe(self._resume)

    def _resume(self, want: int | None = None) -> None:
        if self._paused and not self._closed and self._buffer is None:
            self._next_buffer(want)

    # -- failure -------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        # The bytes that came before the failure are the reader's (a resume starts after them).
        self._hand_on()
        if self._error is None:
            self._error = error
        if self._transport is not None and not self._closed:
            self._transport.abort()
        self._wake()

    def _arm_watchdog(self) -> None:
        self._watchdog = self._loop.call_at(self._last_read + self._read_timeout,
                                            self._check_silence)

    def _check_silence(self) -> None:
        """Runs once per read_timeout at most: fail the connection after that long without a
        byte (while it reads; a pause waiting for the writer and hasher does not count)."""
        self._watchdog = None
        if self._ended or self._closed or self._error is not None:
            return
        now = self._loop.time()
        if self._paused:
            self._last_read = now
            if self._raw and self._waiter is not None:
                self._resume(1)  # the reader waits, maybe holding what the pause waits for
        elif now - self._last_read >= self._read_timeout:
            self._fail(TimeoutError(f"no byte from Glance for {self._read_timeout:g} s"))
            return
        self._arm_watchdog()
