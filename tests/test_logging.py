"""Logging never holds up serving: a stderr that takes no more (journald fell behind)
stalls no request and no exit, the log and a metric say how many lines were lost, and a
record waiting to be written keeps no frame of its exception alive."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from processes import ImgcacheProcess, free_port, wait_for_http

from imgcache.logs import JsonFormatter
from imgcache.logwriter import EXIT_FLUSH_SECONDS, MAX_BATCH, MAX_QUEUED_RECORDS, LogWriter
from imgcache.threadnames import LOGGING

#: Requests at once, and in all: together they log far more than the pipe (64 KiB), the
#: queue and a batch in a write hold.
CONCURRENCY = 16
REQUESTS = MAX_QUEUED_RECORDS + 2_000
#: What each request logs with Glance unreachable: a warning for each of its two questions
#: to Glance (the image, the download check), and its access line.
RECORDS_PER_REQUEST = 3


async def request_images(url: str, count: int) -> list[int]:
    """GET the data of ``count`` images, CONCURRENCY at once, each within 5 s."""
    timeout = aiohttp.ClientTimeout(total=5)
    statuses: list[int] = []
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one_by_one(share: int) -> None:
            for _ in range(share):
                async with session.get(f"{url}/v2/images/{uuid.uuid4()}/file",
                                       headers={"X-Auth-Token": "token"}) as response:
                    await response.read()
                    statuses.append(response.status)

        await asyncio.gather(*(one_by_one(count // CONCURRENCY) for _ in range(CONCURRENCY)))
    return statuses


@pytest.fixture
def unread(tmp_path: Path) -> Iterator[ImgcacheProcess]:
    """A server whose stderr nobody reads (until the test says so), in front of a Glance
    that refuses connections: every request is answered at once, and logged. Start-up is
    waited for without a request to the proxy (it would log one more warning)."""
    server = ImgcacheProcess(f"http://127.0.0.1:{free_port()}", tmp_path / "cache",
                             read_stderr=False, wait=False)
    try:
        wait_for_http(server.metrics_url + "/healthz")
        wait_for_connection(server.port)
        yield server
    finally:
        server.stop()


def wait_for_connection(port: int, seconds: float = 20) -> None:
    """Wait until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


def test_a_stderr_nobody_reads_stalls_no_request(unread: ImgcacheProcess) -> None:
    statuses = asyncio.run(request_images(unread.url, REQUESTS))
    assert statuses == [503] * (REQUESTS // CONCURRENCY * CONCURRENCY)
    dropped = unread.metric("imgcache_log_records_dropped_total")
    assert dropped > 0
    unread.read_stderr_from_now()
    # Once stderr takes lines again, the log says how many were lost meanwhile.
    deadline = time.monotonic() + 20
    while not any("log records dropped" in line for line in unread.stderr_lines):
        assert time.monotonic() < deadline, "no line said how many were dropped"
        time.sleep(0.05)
    stderr = unread.stop()
    said = sum(int(m[1]) for m in re.finditer(r"log records dropped: (\d+)", stderr))
    assert said == dropped
    # Every record of a request was written or counted, once.
    written = stderr.count("WARNING imgcache.upstream") + stderr.count("image request ")
    assert written + said == RECORDS_PER_REQUEST * len(statuses)


def test_an_exit_writes_what_is_queued(unread: ImgcacheProcess) -> None:
    assert set(asyncio.run(request_images(unread.url, 4_000))) == {503}
    unread.proc.send_signal(signal.SIGTERM)
    time.sleep(1)  # stopped, its last lines queued behind the backlog; then stderr reads
    unread.read_stderr_from_now()
    assert unread.proc.wait(timeout=EXIT_FLUSH_SECONDS + 20) == 0
    stderr = unread.stop()
    # The full queue went out before the exit (its lines, then how many did not fit:
    # "stopped" among them).
    written = stderr.count("WARNING imgcache.upstream") + stderr.count("image request ")
    assert written >= MAX_QUEUED_RECORDS
    assert re.search(r"log records dropped: \d+ \(.*\)$", stderr.rstrip())


def test_a_stderr_nobody_reads_stalls_no_exit(unread: ImgcacheProcess) -> None:
    assert set(asyncio.run(request_images(unread.url, 4_000))) == {503}
    started = time.monotonic()
    unread.proc.send_signal(signal.SIGTERM)
    # Nothing to drain: the exit waits for the writer at most EXIT_FLUSH_SECONDS.
    assert unread.proc.wait(timeout=EXIT_FLUSH_SECONDS + 20) == 0
    assert time.monotonic() - started < EXIT_FLUSH_SECONDS + 15
    unread.read_stderr_from_now()
    assert "Fatal Python error" not in unread.stop()


@pytest.fixture
def stalled_pipe() -> Iterator[tuple[int, int]]:
    """A pipe (read end, write end) whose write end is full: a write to it blocks."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"\n" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


class Reader:
    """Reads a pipe on a thread of its own, from now on, until it is closed."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._seen = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while data := os.read(self._fd, 1 << 20):
                self._seen += data

    def until(self, text: str, seconds: float = 20) -> str:
        """Wait until ``text`` was read; return all that was."""
        deadline = time.monotonic() + seconds
        while text.encode() not in self._seen:
            assert time.monotonic() < deadline, f"{text!r} never came: {self._seen[-500:]!r}"
            time.sleep(0.01)
        return self._seen.decode(errors="replace")


def record(message: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    """A record as a logger of this test would make it."""
    return logging.getLogger("test").makeRecord("test", logging.WARNING, __file__, 0, message,
                                                args, exc_info)  # type: ignore[arg-type]


@pytest.fixture
def stalled(stalled_pipe: tuple[int, int]) -> Iterator[tuple[LogWriter, int]]:
    """A writer of bare messages to a full pipe, and the pipe's read end."""
    read_end, write_end = stalled_pipe
    writer = LogWriter(write_end, logging.Formatter("%(message)s"))
    try:
        yield writer, read_end
    finally:
        Reader(read_end)  # lets a writer blocked on the pipe finish
        writer.stop()


def test_a_waiting_record_keeps_no_frame_of_its_exception(
        stalled: tuple[LogWriter, int]) -> None:
    writer, read_end = stalled
    writer.queue(record("this one waits in a write to the full pipe"))
    time.sleep(0.3)  # the writer took it, and waits: what comes next waits in the queue

    class Buffer:
        """Stands for what a frame may hold: a receive buffer, a connection."""

    def fail(buffer: Buffer) -> None:
        raise ValueError("the transfer broke")

    buffer = Buffer()
    alive = weakref.ref(buffer)
    try:
        fail(buffer)
    except ValueError as exc:
        writer.queue(record("a fill failed", exc_info=(type(exc), exc, exc.__traceback__)))
    del buffer
    gc.collect()
    assert alive() is None  # while the record waits behind the full pipe
    text = Reader(read_end).until("the transfer broke")
    assert "a fill failed" in text and "in fail" in text and "ValueError" in text


def test_a_json_line_carries_the_exception() -> None:
    read_end, write_end = os.pipe()
    writer = LogWriter(write_end, JsonFormatter())
    try:
        try:
            raise ValueError("the transfer broke")
        except ValueError as exc:
            writer.queue(record("a fill failed", exc_info=(type(exc), exc, exc.__traceback__)))
        line = Reader(read_end).until("}\n")
    finally:
        writer.stop()
        os.close(read_end)
        os.close(write_end)
    doc = json.loads(line)
    assert doc["message"] == "a fill failed"
    assert doc["exception"].endswith("ValueError: the transfer broke")
    assert "Traceback (most recent call last)" in doc["exception"]


def test_a_log_call_that_cannot_be_formatted_raises_nothing(
        stalled: tuple[LogWriter, int]) -> None:
    writer, read_end = stalled

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    writer.queue(record("two values %s %s", "only one"))
    writer.queue(record(Unprintable()))  # type: ignore[arg-type]
    text = Reader(read_end).until("Unprintable object at")
    assert "a log message of test could not be formatted" in text
    assert "not enough arguments" in text and "'two values %s %s'" in text


def test_drops_are_counted_and_said_in_their_place(stalled: tuple[LogWriter, int]) -> None:
    writer, read_end = stalled
    for n in range(MAX_QUEUED_RECORDS + MAX_BATCH + 5):  # the queue, and a batch in a write
        writer.queue(record("line %d", n))
    assert writer.dropped_total >= 5
    dropped = writer.dropped_total
    reader = Reader(read_end)
    writer.flush(20)  # the queue is written out
    writer.queue(record("after the drops"))
    text = reader.until("after the drops")
    lines = [line for line in text.split("\n") if line.startswith(("line", "log records"))]
    assert lines[-1] == (f"log records dropped: {dropped} (stderr took no more for a while, or "
                         "writing to it failed; is journald keeping up? `journalctl -u "
                         "systemd-journald`)")
    kept = [int(line.split()[1]) for line in lines[:-1]]
    assert kept == list(range(len(kept)))  # in order, then the notice, then the next line
    assert len(kept) + dropped == MAX_QUEUED_RECORDS + MAX_BATCH + 5


def test_a_stderr_that_fails_costs_one_count_per_record() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails (EPIPE)
    writer = LogWriter(write_end, logging.Formatter("%(message)s"))
    try:
        for n in range(10):
            writer.queue(record("line %d", n))
        writer.flush(1)  # (it waits the whole second: the notice cannot be written)
        before = writer_wakeups()
        time.sleep(0.5)
        # It waits for the next record: it neither retries its notice nor counts it again.
        assert writer_wakeups() - before < 5
        assert writer.dropped_total == 10
    finally:
        writer.stop()
        os.close(write_end)
    nowhere = LogWriter(None, logging.Formatter("%(message)s"))
    nowhere.queue(record("lost"))
    assert nowhere.dropped_total == 1


def writer_wakeups() -> int:
    """How many times this process's log writer threads went to sleep and woke."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == LOGGING:
                status = (task / "status").read_text()
                total += int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status)[1])
    return total
