"""The sd_notify client against a real NOTIFY_SOCKET the test binds, as systemd does: in
process, and end to end with ``imgcache serve`` as a process."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from processes import ImgcacheProcess

from imgcache.notify import SystemdNotifier


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket; a
    thread records each message with its arrival time and may react to it (``on_message``
    runs on that thread, before the next message is read)."""

    def __init__(self, kind: str, on_message: Callable[[str], None] | None = None) -> None:
        self._dir: str | None = None
        if kind == "path":  # a short directory: sun_path holds at most 107 bytes
            self._dir = tempfile.mkdtemp(prefix="imgcache-notify-")
            self.env_value = os.path.join(self._dir, "notify.sock")
            address: str | bytes = self.env_value
        else:
            self.env_value = f"@imgcache-test-{uuid.uuid4().hex}"
            address = b"\0" + self.env_value[1:].encode()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._on_message = on_message
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            arrived = time.monotonic()
            message = data.decode()
            if self._on_message is not None:
                self._on_message(message)
            with self._changed:
                self.messages.append((arrived, message))
                self._changed.notify_all()

    def texts(self) -> list[str]:
        """The messages received so far."""
        with self._changed:
            return [text for _, text in self.messages]

    def times_of(self, text: str) -> list[float]:
        """Arrival times of the messages equal to ``text``."""
        with self._changed:
            return [at for at, message in self.messages if message == text]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10) -> float:
        """Wait for a message matching ``predicate``; return its arrival time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for at, text in self.messages:
                    if predicate(text):
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such message; received {self.messages!r}")
                self._changed.wait(left)

    def close(self) -> None:
        """Stop the thread, close the socket, remove its directory."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[NotifyListener]:
    bound = NotifyListener(request.param)
    yield bound
    bound.close()


def test_messages_arrive_in_order(listener: NotifyListener) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value})
    assert notifier.enabled
    notifier.ready("serving on 127.0.0.1:9293")
    notifier.status("2 fills\nin progress")
    notifier.stopping()
    expected = ["READY=1\nSTATUS=serving on 127.0.0.1:9293", "STATUS=2 fills in progress",
                "STOPPING=1\nSTATUS=stopping"]
    listener.wait_for(lambda text: text.startswith("STOPPING=1"))
    assert listener.texts() == expected
    notifier.close()


async def test_watchdog_pings_every_half_of_watchdog_usec(listener: NotifyListener) -> None:
    """WATCHDOG_USEC=200 ms: a ping at once, then one every 100 ms until cancelled. (The
    send is non-blocking: blockbuster would fail this test on a blocking sendto.)"""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value,
                                "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == pytest.approx(0.1)
    pinging = asyncio.create_task(notifier.watchdog())
    await asyncio.sleep(1.05)
    pinging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pinging
    await asyncio.sleep(0.1)  # the last ping's datagram reaches the listener thread
    pings = listener.times_of("WATCHDOG=1")
    assert 7 <= len(pings) <= 12, pings  # 11 on an idle machine
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert statistics.median(gaps) == pytest.approx(0.1, abs=0.04), gaps
    await asyncio.sleep(0.3)
    assert len(listener.times_of("WATCHDOG=1")) == len(pings), "pings went on after cancel"
    notifier.close()


@pytest.mark.parametrize("watchdog_env", [
    {},  # no watchdog asked for
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},  # meant for another process
    {"WATCHDOG_USEC": "soon"},
], ids=["unset", "zero", "other-pid", "malformed"])
async def test_watchdog_is_a_no_op_unless_asked_of_this_process(
    listener: NotifyListener, watchdog_env: dict[str, str]
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": listener.env_value, **watchdog_env})
    assert notifier.watchdog_interval is None
    await asyncio.wait_for(notifier.watchdog(), 1)  # returns at once
    await asyncio.sleep(0.2)
    assert listener.texts() == []


async def test_nothing_is_sent_without_notify_socket(listener: NotifyListener) -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())})
    assert not notifier.enabled
    notifier.ready()
    notifier.status("serving")
    notifier.stopping()
    await asyncio.wait_for(notifier.watchdog(), 1)
    await asyncio.sleep(0.3)
    assert listener.texts() == []


def test_unusable_notify_socket_values_disable_notifications() -> None:
    for value in ("", "vsock:2:1234", "relative/notify.sock"):
        notifier = SystemdNotifier({"NOTIFY_SOCKET": value})
        assert not notifier.enabled
        notifier.ready()


def test_the_environment_is_read_by_default(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    SystemdNotifier().status("from os.environ")
    listener.wait_for(lambda text: text == "STATUS=from os.environ")


def test_a_failed_send_is_logged_once_and_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/imgcache/notify.sock"})
    with caplog.at_level(logging.WARNING, logger="imgcache.notify"):
        notifier.ready()
        notifier.status("still here")
        notifier.stopping()
    warnings = [r for r in caplog.records if r.name == "imgcache.notify"]
    assert len(warnings) == 1, warnings
    assert "/nonexistent/imgcache/notify.sock" in warnings[0].getMessage()


def test_a_full_socket_queue_never_blocks_the_sender(caplog: pytest.LogCaptureFixture) -> None:
    """A systemd that reads nothing (its queue holds a few datagrams): sends fail at once
    with EAGAIN instead of blocking the server, and the failure is logged once."""
    with tempfile.TemporaryDirectory(prefix="imgcache-notify-") as directory:
        path = os.path.join(directory, "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:
            deaf.bind(path)
            notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
            sender = threading.Thread(
                target=lambda: [notifier.status(f"update {i}") for i in range(2000)],
                daemon=True)
            with caplog.at_level(logging.WARNING, logger="imgcache.notify"):
                sender.start()
                sender.join(10)
            assert not sender.is_alive(), "sending blocked on a full socket queue"
            assert deaf.recv(4096) == b"STATUS=update 0"
            notifier.close()
    warnings = [r for r in caplog.records if r.name == "imgcache.notify"]
    assert len(warnings) == 1, warnings


def answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (any status) right now."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def test_imgcache_serve_notifies_systemd(tmp_path: Path) -> None:
    """``imgcache serve`` with NOTIFY_SOCKET and WATCHDOG_USEC set: READY=1 once, and only
    when /healthz and the proxy listener already answer; WATCHDOG=1 pings while serving;
    STOPPING=1 only after SIGTERM; then a clean exit.

    Waits for app.serve_forever to use imgcache.notify (ready() once both listeners serve,
    watchdog() while serving, stopping() on SIGTERM): until then no READY=1 arrives."""
    urls: dict[str, str] = {}
    known = threading.Event()
    at_ready: dict[str, bool] = {}

    def probe(message: str) -> None:
        if message.startswith("READY=1") and known.wait(10):
            at_ready["healthz"] = answers(urls["metrics"] + "/healthz")
            at_ready["proxy"] = answers(urls["proxy"] + "/")

    listener = NotifyListener("path", on_message=probe)
    server = ImgcacheProcess(
        "http://127.0.0.1:9", tmp_path / "cache",
        env={"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "500000"}, wait=False)
    try:
        urls.update(metrics=server.metrics_url, proxy=server.url)
        known.set()
        ready = listener.wait_for(lambda text: text.startswith("READY=1"), timeout=20)
        assert at_ready == {"healthz": True, "proxy": True}, "READY=1 before serving"
        time.sleep(1.6)  # about 6 pings at 250 ms
        pings = [at for at in listener.times_of("WATCHDOG=1") if at > ready]
        assert len(pings) >= 3, listener.texts()
        assert not any(text.startswith("STOPPING=1") for text in listener.texts())
        sent_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for(lambda text: text.startswith("STOPPING=1"), timeout=20)
        assert stopping >= sent_term
        assert server.proc.wait(40) == 0
        assert sum(text.startswith("READY=1") for text in listener.texts()) == 1
    finally:
        stderr = server.stop()
        listener.close()
    assert "Traceback" not in stderr, stderr
