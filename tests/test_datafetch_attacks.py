"""Attacks on imgcache.datafetch from a hostile review: answers a real server may send that
the image-data client must read as HTTP frames them (whitespace in Content-Length, split
Transfer-Encoding fields, TLS cut without close_notify, trailers, a protocol switch, CONNECT
to a default port), and a chunked body's memory bound."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import tracemalloc
from pathlib import Path

import pytest
from inloop import TOKEN, ImgcacheFactory
from pki import Pki, make_pki
from test_datafetch import body_of, client, raw_server

from imgcache.datafetch import BadAnswer, DataClient, Disconnected, TunnelRefused
from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20


async def test_a_content_length_with_trailing_whitespace_ends_the_body() -> None:
    # RFC 9110 5.5: OWS around a field value is not part of it; llhttp frames the body by
    # this length, but hands the value on with its trailing blank.
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5 \r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"hello")  # in a segment of its own
        await writer.drain()
        await held.wait()  # a keep-alive server: the length ends the body

    held = asyncio.Event()
    async with raw_server(script) as url:
        response = await client(read_timeout=3.0).get(url + "/x", {})
        try:
            assert await asyncio.wait_for(body_of(response), 2) == b"hello"
            assert response.content_length == 5
        finally:
            response.release()
            held.set()


async def test_a_length_with_trailing_whitespace_cut_short_is_an_error() -> None:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000 \r\n\r\n" + b"x" * 10)
        await writer.drain()  # then the connection closes, 990 bytes short

    async with raw_server(script) as url:
        response = await client().get(url + "/x", {})
        try:
            got = b""
            try:
                got = await body_of(response)
            except (Disconnected, BadAnswer):
                return
            raise AssertionError(f"a body cut short after {len(got)} of 1000 bytes ended "
                                 "cleanly")
        finally:
            response.release()


async def test_chunked_framing_never_reaches_the_body() -> None:
    # Transfer-Encoding in two fields (RFC 9112 6.1: a list, chunked last): llhttp reads the
    # body as chunked; the client must not take the chunk framing for image bytes.
    payload = random.randbytes(300_000)

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the body in segments of its own
        writer.write(b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n")
        await writer.drain()

    async with raw_server(script) as url:
        response = await client().get(url + "/x", {})
        try:
            try:
                body = await body_of(response)
            except (BadAnswer, Disconnected):
                return  # refusing the answer is fine too
            assert len(body) == len(payload) and body == payload, (
                f"{len(body)} bytes, starting {body[:12]!r}: the chunk framing is in them")
        finally:
            response.release()


async def test_a_chunked_body_nobody_reads_is_held_back() -> None:
    # The memory bound of a download (POOL_BUFFERS x BUFFER_BYTES) must hold for a chunked
    # body too: while nothing takes its pieces (the writer thread is behind), the client stops
    # reading, and the server's writes block. Counted on the server's side.
    chunk = random.randbytes(1 * MiB)
    total = 256
    sent = 0
    done = asyncio.Event()

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(total):
                writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                await writer.drain()
                sent += 1
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            done.set()

    async with raw_server(script) as url:
        response = await client().get(url + "/x", {})
        try:
            await asyncio.sleep(3.0)  # nobody reads
            assert sent <= 64, (f"the server wrote {sent} MiB of a chunked body nobody read: "
                                "all of it waits in the client's memory")
        finally:
            response.release()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1 (made off the loop)."""
    return make_pki(tmp_path / "pki")


async def test_a_body_to_the_close_cut_without_close_notify_is_an_error(pki: Pki) -> None:
    # Over TLS, only Glance's close_notify ends a body that runs to the close; a connection
    # that just ends (the peer crashed, or an attacker on the path sent a FIN) may have cut
    # it short (RFC 9112 9.8), and must not look like the body's end.
    body = random.randbytes(3 * MiB)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + body[:MiB])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()  # no close_notify: two thirds of the body never came

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_context())
    port = server.sockets[0].getsockname()[1]
    data = DataClient(connect_timeout=5.0, read_timeout=5.0,
                      ssl_context=ssl.create_default_context(cafile=str(pki.ca_file)))
    try:
        response = await data.get(f"https://127.0.0.1:{port}/x", {})
        got = 0
        try:
            with pytest.raises(Disconnected):
                while (piece := await response.next_piece()) is not None:
                    got += len(piece)
                    piece.release()
                raise AssertionError(f"{got} of {len(body)} bytes, then a clean end")
        finally:
            response.release()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_image_streamed_to_a_client_that_stopped_reading_stays_bounded(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, chunked: bool
) -> None:
    # A BYPASS download (the image is larger than the cache): the client
    # stops reading, the stream to it waits, and so must the download from Glance. Measured
    # with tracemalloc in this process (imgcache and the stand-in run in it).
    imgcache = await imgcache_factory(max_size="1M")
    image = await glance.add_image(size=96 * MiB)
    glance.faults[image.id] = Fault(chunked=chunked)  # the length-framed one is the control
    tracemalloc.start()
    try:
        async with imgcache.session.get(imgcache.data_url(image.id),
                                        headers={"X-Auth-Token": TOKEN}) as response:
            assert response.headers["X-Cache-Status"] == "BYPASS"
            await response.content.readexactly(MiB)
            await asyncio.sleep(3.0)  # reads nothing more
            held, _ = tracemalloc.get_traced_memory()
            response.close()
    finally:
        tracemalloc.stop()
    assert held < 40 * MiB, (f"{held / MiB:.0f} MiB held while the client read nothing: the "
                             "body was taken in whatever the client's pace")


async def test_a_tunnel_to_glance_on_the_default_port_names_the_port() -> None:
    # RFC 9110 9.3.6: CONNECT's target is authority-form, host ":" port, also for 443 (Squid
    # and tinyproxy refuse one without a port); a Glance URL like https://glance/ has none.
    lines: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TunnelRefused):
            await client(proxy=f"http://127.0.0.1:{port}").get("https://127.0.0.1/x", {})
    finally:
        server.close()
        await server.wait_closed()
    assert lines == [b"CONNECT 127.0.0.1:443 HTTP/1.1"]


async def test_the_trailer_section_of_a_chunked_body_is_bounded_like_a_head() -> None:
    # A head is refused past MAX_HEAD_BYTES; the trailer section after a chunked body is a
    # field section too, and must not grow the client's memory without bound (4 MiB of
    # short trailer fields here; each kept field costs far more than its 5 bytes).
    trailers = b"X:y\r\n" * (800_000)

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
        for i in range(0, len(trailers), 64 << 10):
            writer.write(trailers[i:i + (64 << 10)])
            await writer.drain()
        writer.write(b"\r\n")
        await writer.drain()

    async with raw_server(script) as url:
        tracemalloc.start()
        try:
            response = await client().get(url + "/x", {})
            try:
                with contextlib.suppress(BadAnswer, Disconnected):
                    await body_of(response)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                response.release()
        finally:
            tracemalloc.stop()
    assert peak < 24 * MiB, f"{peak / MiB:.0f} MiB for 4 MiB of trailer fields"


async def test_a_protocol_switch_is_a_bad_answer_not_a_crash_in_the_protocol() -> None:
    # httptools raises HttpParserUpgrade (not an HttpParserError) on a 101; it must become
    # BadAnswer, not escape buffer_updated (asyncio logs "Fatal error on transport" and the
    # caller is told the connection closed before the head).
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: upgrade\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.5)

    async with raw_server(script) as url:
        with pytest.raises(BadAnswer):
            response = await client().get(url + "/x", {})
            response.release()
