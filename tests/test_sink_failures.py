"""A fill's writer failing while the download waits for buffers: the pieces the writer never
took must be given back, or the receiver, paused until its pool has buffers free again,
waits forever (its watchdog does not count a pause for our own threads as silence), and so
do the fill and every client joined to it."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from imgcache.datafetch import DataClient
from imgcache.digest import Expected
from imgcache.errors import FillError
from imgcache.sink import DiskAndHashSink

MiB = 1 << 20
BODY = 64 * MiB


async def _serve_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.1)  # the head alone: every body byte goes to pool buffers
        block = bytes(MiB)
        for _ in range(BODY // MiB):
            writer.write(block)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.mark.timeout(60)
async def test_a_writer_failing_while_the_download_is_paused_fails_the_fill() -> None:
    server = await asyncio.start_server(_serve_body, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The "disk": a pipe nobody reads, so the writer falls behind and every receive buffer
    # ends up held by pieces queued for it; closing the far end then fails its write (EPIPE).
    far, near = os.pipe()
    pipeline = ThreadPoolExecutor(2)
    client = DataClient(connect_timeout=5.0, read_timeout=1.0, ssl_context=None)
    response = await client.get(f"http://127.0.0.1:{port}/v2/images/x/file", {})
    sink = DiskAndHashSink(pipeline, near, Expected(BODY, "size_only", "sha256", ""),
                           lambda count: None)

    async def fill() -> None:
        while (piece := await response.next_piece()) is not None:
            try:
                await sink.feed(piece)
            finally:
                piece.release()

    filling = asyncio.ensure_future(fill())
    try:
        await asyncio.sleep(1.0)  # every buffer in use: the receiver is paused
        assert not filling.done()
        await asyncio.to_thread(os.close, far)
        # Several read_timeouts: the watchdog had every chance to notice.
        with pytest.raises(FillError, match="writing the cache file failed"):
            await asyncio.wait_for(filling, 5.0)
    finally:
        filling.cancel()
        response.release()
        await sink.close()
        await asyncio.to_thread(os.close, near)
        await asyncio.to_thread(pipeline.shutdown)
        server.close()
        await server.wait_closed()
