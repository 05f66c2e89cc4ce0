"""The file sender never lets a big send, or a slow client, hold a thread for its whole
transfer. (That a request cancelled mid-send waits for its thread is LoopThreads' promise:
tests/test_loopthreads.py.)"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from imgcache.loopthreads import LoopThreads
from imgcache.metrics import Metrics
from imgcache.responses import MAX_BYTES_PER_CALL, FileSender, _sendfile_until_blocked

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


def test_a_slow_steady_client_gives_its_thread_back(tmp_path: Path) -> None:
    """A hit client that reads steadily but not fast (64 KiB a millisecond) costs one
    sending call at most WRITABLE_WAIT_SECONDS of waiting in all: the call hands its thread
    back well before MAX_BYTES_PER_CALL. Waiting up to that long for each drain apart kept
    the thread for the whole 4 MiB (and for seconds for a slower client), with only 8
    threads."""
    path = tmp_path / "image"
    path.write_bytes(os.urandom(2 * MAX_BYTES_PER_CALL))
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        reader.connect(listener.getsockname())
        sender, _ = listener.accept()
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        sender.setblocking(False)
        stop = threading.Event()

        def read_slowly() -> None:
            while not stop.is_set() and reader.recv(64 << 10):
                time.sleep(0.001)

        slow = threading.Thread(target=read_slowly)
        slow.start()
        fd = os.open(path, os.O_RDONLY)
        try:
            sent, blocked = _sendfile_until_blocked(sender.fileno(), fd, 0,
                                                    2 * MAX_BYTES_PER_CALL, True)
        finally:
            stop.set()
            sender.close()
            slow.join()
            os.close(fd)
    assert blocked
    assert 0 < sent < MAX_BYTES_PER_CALL // 2
