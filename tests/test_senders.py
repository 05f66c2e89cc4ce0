"""The file sender never lets a big send hold a thread for its whole transfer. (That a
request cancelled mid-send waits for its thread is LoopThreads' promise:
tests/test_loopthreads.py.)"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from imgcache.loopthreads import LoopThreads
from imgcache.metrics import Metrics
from imgcache.responses import MAX_BYTES_PER_CALL, FileSender

MiB = 1 << 20


@pytest.fixture
def files(tmp_path: Path) -> Iterator[dict[str, tuple[int, int]]]:
    """A big file and a small one, open: name -> (fd, size)."""
    opened = {}
    for name, size in (("big", 96 * MiB), ("small", 64 << 10)):
        path = tmp_path / name
        path.write_bytes(os.urandom(MiB) * (size // MiB) if size >= MiB else os.urandom(size))
        opened[name] = (os.open(path, os.O_RDONLY), size)
    yield opened
    for fd, _ in opened.values():
        os.close(fd)


@pytest.fixture
def one_thread() -> Iterator[LoopThreads]:
    """A group of one thread, started here (a thread start blocks the loop)."""
    threads = LoopThreads(1, "test-send")
    threads.start()
    yield threads
    threads.shutdown()


@pytest.fixture
async def one_thread_server(
    files: dict[str, tuple[int, int]], one_thread: LoopThreads
) -> AsyncIterator[tuple[str, list[str]]]:
    """An aiohttp server sending the files with a FileSender on ONE thread; yields its
    URL and the order in which sends finished."""
    sender = FileSender(one_thread, Metrics())
    finished: list[str] = []
    fds = {name: fd for name, (fd, _) in files.items()}
    sizes = {name: size for name, (_, size) in files.items()}

    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        response = web.StreamResponse()
        response.content_length = sizes[name]
        await response.prepare(request)
        await sender.send_file(request, fds[name], 0, sizes[name], sizes[name],
                               lambda _: None)
        finished.append(name)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", finished
    await runner.cleanup()


async def test_a_small_hit_is_not_queued_behind_a_big_one(
    one_thread_server: tuple[str, list[str]]
) -> None:
    url, finished = one_thread_server
    async with aiohttp.ClientSession() as session:
        async def get(name: str) -> int:
            async with session.get(f"{url}/{name}") as response:
                return len(await response.read())

        big = asyncio.create_task(get("big"))
        await asyncio.sleep(0.01)  # the big send has the only thread now
        small = await get("small")
        assert small == 64 << 10
        assert await big == 96 * MiB
    # With its thread held for the whole 96 MiB, the small send would finish last.
    assert finished == ["small", "big"]
    assert 96 * MiB > 4 * MAX_BYTES_PER_CALL
