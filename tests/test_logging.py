"""Logging never holds up serving: a stderr that takes no more (journald fell behind)
stalls no request, and the log says how many lines it lost."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

import aiohttp
from processes import ImgcacheProcess, free_port

from imgcache.logs import MAX_QUEUED_RECORDS

#: Requests at once, and in all: each logs at least one line, and together they log more
#: than the pipe holds (64 KiB) plus what the queue holds.
CONCURRENCY = 16
REQUESTS = MAX_QUEUED_RECORDS + 2_000


async def request_all(url: str) -> list[int]:
    """GET the data of REQUESTS images, CONCURRENCY at once, each within 5 s."""
    timeout = aiohttp.ClientTimeout(total=5)
    statuses: list[int] = []
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one_by_one(count: int) -> None:
            for _ in range(count):
                async with session.get(f"{url}/v2/images/{uuid.uuid4()}/file",
                                       headers={"X-Auth-Token": "token"}) as response:
                    await response.read()
                    statuses.append(response.status)

        await asyncio.gather(*(one_by_one(REQUESTS // CONCURRENCY)
                               for _ in range(CONCURRENCY)))
    return statuses


def test_a_stderr_nobody_reads_stalls_no_request(tmp_path: Path) -> None:
    # Glance is a port nobody listens on: every request is answered at once, and logged.
    server = ImgcacheProcess(f"http://127.0.0.1:{free_port()}", tmp_path / "cache",
                             read_stderr=False)
    try:
        statuses = asyncio.run(request_all(server.url))
        assert len(statuses) == REQUESTS // CONCURRENCY * CONCURRENCY
        assert set(statuses) == {503}
        server.read_stderr_from_now()
        # Once stderr takes lines again, the log says how many were lost meanwhile.
        deadline = time.monotonic() + 20
        while not any("log records were dropped" in line for line in server.stderr_lines):
            assert time.monotonic() < deadline, "no line said how many were dropped"
            time.sleep(0.05)
    finally:
        stderr = server.stop()
    written = stderr.count("image request")
    dropped = sum(int(m[1]) for m in re.finditer(r"(\d+) log records were dropped", stderr))
    # Each request logged its access line and a warning (Glance unreachable), and every
    # record was written or counted.
    assert written > 0 and dropped > 0
    assert stderr.count("WARNING imgcache.upstream") + written + dropped >= 2 * len(statuses)
