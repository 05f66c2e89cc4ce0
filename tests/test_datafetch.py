"""The image-data client (imgcache.datafetch): bodies received into reused buffers, against
real HTTP servers: the Glance stand-in (fills, chunked bodies, resumes) and raw asyncio
servers that write exactly the bytes a test scripts (split heads, interim answers, bodies
that run to the close or break off, silence, proxies that refuse)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import random
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from inloop import ImgcacheFactory

from imgcache import datafetch
from imgcache.datafetch import BadAnswer, DataClient, DataResponse, Disconnected, TunnelRefused
from imgcache.pieces import Piece
from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[str]:
    """A TCP server on loopback that reads one request head and then runs ``script``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def client(read_timeout: float = 5.0, proxy: str | None = None) -> DataClient:
    return DataClient(connect_timeout=5.0, read_timeout=read_timeout, ssl_context=None,
                      proxy=proxy)


async def body_of(response: DataResponse) -> bytes:
    body = bytearray()
    while (piece := await response.next_piece()) is not None:
        body += piece.view
        piece.release()
    return bytes(body)


async def test_a_chunked_body_is_cached_and_verified(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory()
    image = await glance.add_image(size=5 * MiB + 3)
    glance.faults[image.id] = Fault(chunked=True)
    bodies = await asyncio.gather(*(imgcache.get(image.id) for _ in range(4)))
    assert {(status, hashlib.sha512(body).hexdigest()) for status, _, body in bodies} == {
        (200, image.os_hash_value)}
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    assert glance.data_gets(image.id) == 1
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "HIT"
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value


async def test_a_broken_chunked_body_resumes_by_range(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(retry_backoff="0.1s")
    image = await glance.add_image(size=8 * MiB)
    glance.faults[image.id] = Fault(chunked=True, reset_at=3 * MiB + 5, times=1, rate=16 * MiB)
    status, _, body = await imgcache.get(image.id)
    assert status == 200 and hashlib.sha512(body).hexdigest() == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    assert (await imgcache.metrics())['imgcache_fill_resumes_total{how="range"}'] == 1


async def test_a_head_in_single_bytes_and_a_body_to_the_close() -> None:
    body = random.randbytes(3 * MiB + 11)
    head = b"HTTP/1.0 200 OK\r\nX-Thing: a\r\nX-Thing: b\r\n\r\n"

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(len(head) - 1):
            writer.write(head[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(head[-1:] + body[:1000])  # the head's end and the body's start together
        await writer.drain()
        writer.write(body[1000:])
        await writer.drain()

    async with raw_server(script) as url:
        response = await client().get(url + "/x", {})
        try:
            assert response.status == 200 and response.content_length is None
            assert response.headers.getall("X-Thing") == ["a", "b"]
            assert await body_of(response) == body
        finally:
            response.release()


async def test_an_interim_answer_is_skipped() -> None:
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\n"
                     b"Content-Range: bytes 5-9/10\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(5)  # keeps the connection open: the length ends the body

    async with raw_server(script) as url:
        response = await client().get(url + "/x", {})
        try:
            assert response.status == 206
            assert response.headers["Content-Range"] == "bytes 5-9/10"
            assert await body_of(response) == b"hello"
            assert not await response.more()
        finally:
            response.release()


@pytest.mark.parametrize("sent", [500_000, 1000])
async def test_a_body_cut_short_is_an_error_after_the_bytes_that_came(sent: int) -> None:
    # 1000 bytes, sent after the head, are fewer than a piece: they wait in the buffer for
    # more when the connection breaks, and must still reach the reader before the error.
    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"x" * sent)
        await writer.drain()

    async with raw_server(script) as url:
        response = await client().get(url + "/x", {})
        got = 0
        try:
            with pytest.raises(Disconnected, match="bytes of the body missing"):
                while (piece := await response.next_piece()) is not None:
                    got += len(piece)
                    piece.release()
        finally:
            response.release()
        assert got == sent


async def test_silence_times_out_but_a_pause_for_our_own_threads_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(datafetch, "POOL_BUFFERS", 2)
    body = random.randbytes(6 * MiB)
    stall = asyncio.Event()

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(body) + 1))
        writer.write(body)
        await writer.drain()
        await stall.wait()  # never sends its last byte

    async with raw_server(script) as url:
        response = await client(read_timeout=0.3).get(url + "/x", {})
        try:
            held: list[Piece] = []
            # Holding every piece stops the reading once both buffers are full: nothing
            # comes in for longer than read_timeout, and that is not Glance's silence.
            while sum(map(len, held)) < 2 * datafetch.BUFFER_BYTES - datafetch.MIN_READ_BYTES:
                piece = await asyncio.wait_for(response.next_piece(), 2)
                assert piece is not None
                held.append(piece)
            await asyncio.sleep(1.0)
            for piece in held:
                piece.release()
            received = sum(map(len, held))
            with pytest.raises(TimeoutError):
                while (piece := await response.next_piece()) is not None:
                    received += len(piece)
                    piece.release()
            assert received == len(body)
        finally:
            response.release()
            stall.set()


async def test_held_pieces_are_never_received_into_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Up to 3 pieces held, each in a buffer of its own at worst, plus the one received into:
    # reading never waits on the pieces held (it resumes with half of the 8 buffers free),
    # and 40 MiB through them reuses each one several times.
    monkeypatch.setattr(datafetch, "POOL_BUFFERS", 8)
    body = random.randbytes(40 * MiB)

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()

    async with raw_server(script) as url:
        response = await client().get(url + "/x", {})
        try:
            offset = 0
            held: list[tuple[int, Piece]] = []
            rng = random.Random(7)
            while (piece := await response.next_piece()) is not None:
                held.append((offset, piece))
                offset += len(piece)
                # Give pieces back in a random order, a few at a time, checking each one's
                # bytes only when it is given back (long after more bytes came in).
                while held and (len(held) > 3 or rng.random() < 0.3):
                    at, old = held.pop(rng.randrange(len(held)))
                    assert bytes(old.view) == body[at:at + len(old)]
                    old.release()
            for at, old in held:
                assert bytes(old.view) == body[at:at + len(old)]
                old.release()
            assert offset == len(body)
        finally:
            response.release()


async def test_a_header_that_http_cannot_carry_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        await client().get("http://127.0.0.1:1/x", {"X-Auth-Token": "a\r\nX-Evil: 1"})


async def test_a_proxy_refusing_the_tunnel_and_one_sending_junk_after_it() -> None:
    async def refuse(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def junk(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\nnot TLS")
        await writer.drain()
        await asyncio.sleep(5)

    async with raw_server(refuse) as proxy:
        with pytest.raises(TunnelRefused) as refused:
            await client(proxy=proxy).get("https://127.0.0.1:9/x", {})
        assert refused.value.status == 403
    async with raw_server(junk) as proxy:
        with pytest.raises(BadAnswer):
            await client(proxy=proxy).get("https://127.0.0.1:9/x", {})


async def test_a_released_download_frees_its_buffers_without_waiting_for_the_gc() -> None:
    # The connection and its buffer pool refer to each other; with the cyclic collector off,
    # only release() breaking that circle frees the buffers of one download after another.
    body = random.randbytes(4 * MiB)

    async def script(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()

    gc.disable()
    tracemalloc.start()
    try:
        async with raw_server(script) as url:
            for download in range(6):
                response = await client().get(url + "/x", {})
                try:
                    assert await body_of(response) == body
                finally:
                    response.release()
                if download == 0:
                    after_first = tracemalloc.get_traced_memory()[0]
            grown = tracemalloc.get_traced_memory()[0] - after_first
    finally:
        tracemalloc.stop()
        gc.enable()
    assert grown < 2 * MiB, f"{grown / MiB:.1f} MiB kept after 5 more downloads"
