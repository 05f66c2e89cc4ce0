"""Load against a real ``imgcache serve`` process, bounded in count and time.

- 1,000 clients connected at once, half on a cached image and half on a cold one whose
  download from Glance is trickled: every body is the image, Glance sees one download.
- Clients reading at 1 KB/s beside fast ones: the fast ones take about as long as alone,
  the slow ones keep getting bytes and in the end get the whole image.
- A soak (``SOAK_SECONDS``, default 60) of hits, misses on new images, ranges, pass-through
  requests and clients leaving mid-body, sampling the server's open fds and RSS each second:
  both stay flat, the fds come back to where they were, and nothing gets a 5xx.

The Glance stand-in runs on an event loop in a thread of the test process (so its fault
knobs can be turned); the clients run on the test's own loop, on raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from processes import ImgcacheProcess

from imgcache.standin import Fault, GlanceStandin, StandinImage

KiB = 1 << 10
MiB = 1 << 20
TOKEN = "token-a"
OTHER_TOKEN = "token-b"
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
_T = TypeVar("_T")


# -- the stand-in on a loop of its own --------------------------------------------------------


class StandinThread:
    """A GlanceStandin served by an event loop in a daemon thread of this process."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="glance-standin")
        self._thread.start()
        self.standin = GlanceStandin(data_dir, tokens=(TOKEN, OTHER_TOKEN))
        self.call(self.standin.start())

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the stand-in's loop; from synchronous code only."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the stand-in's loop, from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def add_image(self, size: int, **kwargs: Any) -> tuple[StandinImage, bytes]:
        """A new image of ``size`` pseudo-random bytes, and those bytes."""
        image = await self.run(self.standin.add_image(size=size, **kwargs))
        data = await asyncio.to_thread(Path(image.path or "").read_bytes)
        return image, data

    async def drop_image(self, image: StandinImage) -> None:
        """Forget an image and delete its file (keeps a long soak's disk use bounded)."""

        async def forget() -> None:  # on the stand-in's loop, which reads its images
            self.standin.images.pop(image.id, None)

        await self.run(forget())
        await asyncio.to_thread(Path(image.path or "").unlink, True)

    def stop(self) -> None:
        self.call(self.standin.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fd_limit() -> Iterator[int]:
    """Enough file descriptors for 1,000 connections at both ends (the imgcache process
    inherits the limit from this one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 1 << 16)
    if wanted < 5000:
        pytest.fail(f"the hard limit of open files is {hard}; the load tests need 5000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinThread]:
    standin = StandinThread(tmp_path_factory.mktemp("glance"))
    yield standin
    standin.stop()


@contextlib.contextmanager
def serving(glance: StandinThread, cache_dir: Path, max_size: str) -> Iterator[
        ImgcacheProcess]:
    """imgcache as a process in front of the stand-in."""
    process = ImgcacheProcess(glance.standin.url, cache_dir, max_size=max_size)
    try:
        yield process
    finally:
        log = process.stop()
        print("--- imgcache warnings and errors:\n" + "\n".join(
            line for line in log.splitlines() if " WARNING " in line or " ERROR " in line))


def assert_no_handler_raised(server: ImgcacheProcess) -> None:
    """aiohttp logs "Error handling request" when a handler raised: a bug, whatever the
    client saw (a 500, or a connection that was gone anyway)."""
    log = "".join(server.stderr_lines)
    unhandled = log.find("Error handling request")
    assert unhandled < 0, log[max(0, unhandled - 1000):unhandled + 5000]


@pytest.fixture
def server(tmp_path: Path, glance: StandinThread, fd_limit: int) -> Iterator[
        ImgcacheProcess]:
    with serving(glance, tmp_path / "cache", "1G") as process:
        yield process


@pytest.fixture
def small_server(tmp_path: Path, glance: StandinThread, fd_limit: int) -> Iterator[
        ImgcacheProcess]:
    """A cap of 24 MiB: misses evict all along."""
    with serving(glance, tmp_path / "cache", "24M") as process:
        yield process


# -- a raw HTTP client ------------------------------------------------------------------------


@dataclass
class Answer:
    """What one request got: status, X-Cache-Status, body bytes, whether they were right."""

    status: int
    cache_status: str = ""
    length: int = 0
    right: bool = True


class Connection:
    """One client connection on a raw non-blocking socket; one request (Connection: close).
    Bodies are compared with the image as they arrive, never kept whole."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.pending = b""  # body bytes that came with the response head

    @classmethod
    async def open(cls, port: int, receive_buffer: int | None = None) -> Connection:
        """Connect; a small ``receive_buffer`` makes the server's sends to a slow reader
        block early (it is set before connecting, so the TCP window stays small)."""
        sock = socket.socket()
        sock.setblocking(False)
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, method: str, path: str, headers: dict[str, str],
                   body: bytes = b"") -> tuple[int, dict[str, str]]:
        """Send a request; return the response's status and (lower-cased) headers."""
        lines = [f"{method} {path} HTTP/1.1", "Host: imgcache", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        await self.loop.sock_sendall(self.sock, ("\r\n".join(lines) + "\r\n\r\n").encode()
                                     + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = await self.loop.sock_recv(self.sock, 64 * KiB)
            if not chunk:
                raise ConnectionError(f"closed before a response head: {received[:200]!r}")
            received += chunk
        head, _, self.pending = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}

    async def receive(self, size: int) -> bytes:
        """Up to ``size`` body bytes; b"" at the end of the connection."""
        if self.pending:
            chunk, self.pending = self.pending[:size], self.pending[size:]
            return chunk
        return await self.loop.sock_recv(self.sock, size)

    async def body(self, headers: dict[str, str], expected: bytes | None,
                   answer: Answer | None = None) -> Answer:
        """Read the body to its end (or on from ``answer``), comparing it with ``expected``."""
        length = int(headers.get("content-length", -1))
        answer = answer or Answer(0, headers.get("x-cache-status", ""))
        while length < 0 or answer.length < length:
            chunk = await self.receive(MiB)
            if not chunk:
                break
            if expected is not None:
                answer.right &= expected[answer.length:answer.length + len(chunk)] == chunk
            answer.length += len(chunk)
        answer.right &= length < 0 or answer.length == length
        if expected is not None:
            answer.right &= answer.length == len(expected)
        return answer

    def close(self) -> None:
        self.sock.close()


async def get(port: int, path: str, expected: bytes | None = None,
              headers: dict[str, str] | None = None, method: str = "GET",
              body: bytes = b"") -> Answer:
    """One request on a connection of its own: the answer, the body checked."""
    connection = await Connection.open(port)
    try:
        status, response_headers = await connection.send(
            method, path, headers if headers is not None else {"X-Auth-Token": TOKEN}, body)
        answer = await connection.body(response_headers, expected)
        answer.status = status
        return answer
    finally:
        connection.close()


def data_path(image_id: str) -> str:
    return f"/v2/images/{image_id}/file"


# -- 1,000 clients at once ------------------------------------------------------------------


async def test_a_thousand_clients_at_once_get_the_image_with_one_glance_download(
    glance: StandinThread, server: ImgcacheProcess
) -> None:
    hot, hot_data = await glance.add_image(size=1 * MiB)
    cold, cold_data = await glance.add_image(size=1 * MiB)
    assert (await get(server.port, data_path(hot.id), hot_data)).right
    await asyncio.to_thread(server.wait_for_metric,
                            'imgcache_fills_total{outcome="committed"}', 1)
    glance.standin.faults[cold.id] = Fault(rate=512 * KiB)  # the fill takes about 2 s

    connections = await asyncio.gather(*(Connection.open(server.port) for _ in range(1000)))
    # The server holds all 1,000 connections before a single request goes out.
    deadline = time.monotonic() + 20
    while (held := await asyncio.to_thread(server.client_connections)) < 1000:
        assert time.monotonic() < deadline, f"the server holds {held} connections, not 1,000"
        await asyncio.sleep(0.1)

    async def fetch(connection: Connection, image: StandinImage, data: bytes) -> Answer:
        try:
            status, headers = await connection.send("GET", data_path(image.id),
                                                    {"X-Auth-Token": TOKEN})
            answer = await connection.body(headers, data)
            answer.status = status
            return answer
        finally:
            connection.close()

    started = time.monotonic()
    async with asyncio.timeout(120):
        answers = await asyncio.gather(
            *(fetch(c, hot, hot_data) for c in connections[:500]),
            *(fetch(c, cold, cold_data) for c in connections[500:]))
    took = time.monotonic() - started

    assert Counter(a.status for a in answers) == {200: 1000}
    assert all(a.right for a in answers)
    assert Counter(a.cache_status for a in answers[:500]) == {"HIT": 500}
    assert Counter(a.cache_status for a in answers[500:]) == {"COALESCED": 499, "MISS": 1}
    assert glance.standin.data_gets(cold.id) == 1
    assert took < 60
    assert_no_handler_raised(server)
    print(f"\n1,000 clients (500 hits, 500 on a 2 s fill): {took:.1f} s")


# -- slow readers beside fast ones ------------------------------------------------------------


class SlowReader:
    """A client that takes 1 KB a second off its socket (whose receive buffer is small, so
    the server's sends block), noting when each KB arrived; later it reads the rest fast."""

    def __init__(self, port: int, path: str, expected: bytes) -> None:
        self.port = port
        self.path = path
        self.expected = expected
        self.arrivals: list[float] = []
        self.status = 0
        self.cache_status = ""

    async def run(self, slow_until: asyncio.Event) -> Answer:
        connection = await Connection.open(self.port, receive_buffer=4 * KiB)
        try:
            self.status, headers = await connection.send("GET", self.path,
                                                         {"X-Auth-Token": TOKEN})
            self.cache_status = headers.get("x-cache-status", "")
            answer = Answer(self.status, self.cache_status)
            while not slow_until.is_set():
                chunk = await connection.receive(KiB)
                if not chunk:
                    break
                self.arrivals.append(time.monotonic())
                answer.right &= self.expected[answer.length:answer.length + len(chunk)] == chunk
                answer.length += len(chunk)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await slow_until.wait()
            # Slow no more: a bigger window, the rest at full speed.
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
            return await connection.body(headers, self.expected, answer)
        finally:
            connection.close()


async def fast_clients(port: int, image_id: str, data: bytes, count: int = 4) -> float:
    """Seconds for ``count`` clients downloading the image at once, every body checked."""
    started = time.monotonic()
    answers = await asyncio.gather(*(get(port, data_path(image_id), data)
                                     for _ in range(count)))
    assert all(a.status == 200 and a.right for a in answers), answers
    return time.monotonic() - started


async def test_slow_readers_slow_only_themselves(
    glance: StandinThread, server: ImgcacheProcess
) -> None:
    port = server.port
    hot, hot_data = await glance.add_image(size=64 * MiB)  # what fast clients read
    warm, warm_data = await glance.add_image(size=8 * MiB)  # what slow clients read
    for image, data in ((hot, hot_data), (warm, warm_data)):
        assert (await get(port, data_path(image.id), data)).right
    await asyncio.to_thread(server.wait_for_metric,
                            'imgcache_fills_total{outcome="committed"}', 2)
    alone_cold, alone_data = await glance.add_image(size=16 * MiB)
    slowed_cold, slowed_data = await glance.add_image(size=16 * MiB)
    for cold in (alone_cold, slowed_cold):
        glance.standin.faults[cold.id] = Fault(rate=8 * MiB)  # a fill of about 2 s

    # Baselines, no slow reader around: hits, and clients joining a fill.
    hit_alone = statistics.median([await fast_clients(port, hot.id, hot_data)
                                   for _ in range(3)])
    fill_alone = await fast_clients(port, alone_cold.id, alone_data)

    # 40 slow readers: 20 on cached images, 20 on a cold one (the first starts its fill).
    slow_until = asyncio.Event()
    slow = [SlowReader(port, data_path(warm.id), warm_data) for _ in range(15)]
    slow += [SlowReader(port, data_path(hot.id), hot_data) for _ in range(5)]
    slow += [SlowReader(port, data_path(slowed_cold.id), slowed_data) for _ in range(20)]
    tasks = [asyncio.create_task(reader.run(slow_until)) for reader in slow[:21]]
    async with asyncio.timeout(30):
        while not slow[20].arrivals:  # the fill has begun; the other slow ones join it
            await asyncio.sleep(0.01)
    tasks += [asyncio.create_task(reader.run(slow_until)) for reader in slow[21:]]
    async with asyncio.timeout(30):
        while not all(reader.arrivals for reader in slow):
            await asyncio.sleep(0.05)

    fill_slowed = await fast_clients(port, slowed_cold.id, slowed_data)
    hit_slowed = statistics.median([await fast_clients(port, hot.id, hot_data)
                                    for _ in range(3)])
    await asyncio.sleep(3)  # the slow ones go on a little longer, alone
    slow_until.set()
    async with asyncio.timeout(60):
        answers = await asyncio.gather(*tasks)

    print(f"\nhit: {hit_alone:.2f} s alone, {hit_slowed:.2f} s beside 40 slow readers; "
          f"joining a fill: {fill_alone:.2f} s alone, {fill_slowed:.2f} s beside them")
    assert hit_slowed < 3 * hit_alone + 0.5
    assert fill_slowed < 3 * fill_alone + 0.5
    assert [reader.status for reader in slow] == [200] * 40
    assert [reader.cache_status for reader in slow[20:]] == ["MISS"] + ["COALESCED"] * 19
    assert all(answer.right for answer in answers)  # in the end, the whole image each
    for reader in slow:
        # Bytes kept coming, about 1 KB a second, with no gap of more than 3 s.
        gaps = [b - a for a, b in zip(reader.arrivals, reader.arrivals[1:], strict=False)]
        assert len(reader.arrivals) >= 5 and max(gaps) < 3, gaps
    assert glance.standin.data_gets(slowed_cold.id) == 1
    assert_no_handler_raised(server)


# -- soak --------------------------------------------------------------------------------------


@dataclass
class Soak:
    """The mix of requests and what came of them."""

    port: int
    glance: StandinThread
    known: list[tuple[StandinImage, bytes]]
    sent: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    retired: list[tuple[float, StandinImage]] = field(default_factory=list)

    def check(self, kind: str, answer: Answer, statuses: tuple[int, ...]) -> None:
        self.sent[kind] += 1
        if answer.status >= 500 or answer.status not in statuses or not answer.right:
            self.failures.append(f"{kind}: {answer}")

    async def hit(self) -> None:
        image, data = random.choice(self.known)
        self.check("hit", await get(self.port, data_path(image.id), data), (200,))

    async def miss(self) -> None:
        image, data = await self.glance.add_image(size=random.choice([1, 2, 3]) * MiB)
        self.check("miss", await get(self.port, data_path(image.id), data), (200,))
        self.known.append((image, data))
        # Old images are no longer asked for, and leave Glance 10 s later (when no request
        # that picked one can still be running): disk use stays bounded.
        while len(self.known) > 24:
            self.retired.append((time.monotonic(), self.known.pop(0)[0]))
        while self.retired and self.retired[0][0] < time.monotonic() - 10:
            await self.glance.drop_image(self.retired.pop(0)[1])

    async def range(self) -> None:
        image, data = random.choice(self.known)
        first = random.randrange(len(data))
        last = random.randrange(first, len(data))
        answer = await get(self.port, data_path(image.id), data[first:last + 1],
                           {"X-Auth-Token": TOKEN, "Range": f"bytes={first}-{last}"})
        self.check("range", answer, (206,))

    async def passthrough(self) -> None:
        image, _ = random.choice(self.known)
        self.check("pass-through", await get(self.port, f"/v2/images/{image.id}"), (200,))
        body = random.randbytes(64 * KiB)
        self.check("pass-through", await get(self.port, "/_standin/echo", method="POST",
                                             body=body), (200,))
        denied = await get(self.port, data_path(image.id), headers={"X-Auth-Token": "nope"})
        self.check("denied", denied, (401,))

    async def leave_mid_body(self) -> None:
        new = random.random() < 0.5
        if new:
            image, data = await self.glance.add_image(size=2 * MiB)
            self.known.append((image, data))
        else:
            image, data = random.choice(self.known)
        connection = await Connection.open(self.port)
        try:
            status, _ = await connection.send("GET", data_path(image.id),
                                              {"X-Auth-Token": TOKEN})
            wanted = random.randrange(1, 512 * KiB)
            while wanted > 0 and (chunk := await connection.receive(wanted)):
                wanted -= len(chunk)
        finally:
            connection.close()
        self.check("left mid-body", Answer(status), (200,))

    async def worker(self, until: float) -> None:
        actions = [self.hit] * 5 + [self.range] * 2 + [self.miss, self.passthrough,
                                                        self.leave_mid_body]
        while time.monotonic() < until:
            await random.choice(actions)()


@dataclass
class Samples:
    """The server's open fds and RSS, once a second."""

    fds: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    def quarter(self, values: list[int], which: int) -> float:
        size = len(values) // 4
        return statistics.median(values[which * size:(which + 1) * size])


async def test_a_soak_keeps_fds_and_memory_flat_and_never_fails(
    glance: StandinThread, small_server: ImgcacheProcess
) -> None:
    server = small_server
    known = [await glance.add_image(size=2 * MiB) for _ in range(8)]
    for image, data in known:
        assert (await get(server.port, data_path(image.id), data)).right
    await asyncio.to_thread(server.wait_for_metric,
                            'imgcache_fills_total{outcome="committed"}', len(known))

    def fds_but_upstream() -> int:
        """Open fds but pooled connections to Glance and the cache files kept open."""
        return (server.open_fds() - server.upstream_connections(glance.standin.port)
                - server.open_cache_files())

    idle_fds = await asyncio.to_thread(fds_but_upstream)
    soak = Soak(server.port, glance, known)
    samples = Samples()
    workers = 8
    until = time.monotonic() + SOAK_SECONDS

    async def sample() -> None:
        while time.monotonic() < until:
            fds, rss = await asyncio.to_thread(lambda: (server.open_fds(), server.rss()))
            samples.fds.append(fds)
            samples.rss.append(rss)
            await asyncio.sleep(1)

    async with asyncio.timeout(SOAK_SECONDS + 60):
        await asyncio.gather(sample(), *(soak.worker(until) for _ in range(workers)))

    print(f"\nsoak of {SOAK_SECONDS:.0f} s: {dict(soak.sent)}; fds {samples.fds}; "
          f"RSS MiB {[r // MiB for r in samples.rss]}")
    assert soak.failures == []
    assert sum(soak.sent.values()) > 10 * SOAK_SECONDS
    assert len(samples.rss) >= 8
    # Flat: the last quarter's median is within a small margin of the second quarter's.
    assert samples.quarter(samples.rss, 3) < samples.quarter(samples.rss, 1) * 1.1 + 8 * MiB
    assert samples.quarter(samples.fds, 3) < samples.quarter(samples.fds, 1) + 4 * workers
    # Load over: the fds go back to what the idle server had, but for idle connections
    # to Glance that aiohttp keeps for up to 30 s (a pool no larger than the load was) and
    # the recently hit cache files kept open (at most one per cached image).
    def settled() -> tuple[int, int, int]:
        return (fds_but_upstream(), server.open_cache_files(),
                len(os.listdir(server.cache_dir / "data")))

    stopped = time.monotonic()
    while True:
        fds, kept, cached = await asyncio.to_thread(settled)
        if fds <= idle_fds and kept <= cached:
            break
        assert time.monotonic() < stopped + 10, (
            f"{fds} fds open, {idle_fds} when idle; {kept} cache files open, {cached} cached")
        await asyncio.sleep(0.2)
    pool = await asyncio.to_thread(server.upstream_connections, glance.standin.port)
    assert pool <= 2 * workers
    print(f"fds back to {fds} (idle: {idle_fds}) after {time.monotonic() - stopped:.1f} s, "
          f"and {pool} connections to Glance")
    assert_no_handler_raised(server)
