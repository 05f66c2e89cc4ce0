"""Fixtures of the interop suite: one real Keystone + Glance for the whole session, a relay
between imgcache and Glance that can hold a fill in flight (across the test network, so that
imgcache reaches Glance over the emulated link), and a fresh ``imgcache serve`` process per
test.

A stack that cannot start fails every interop test with the reason; nothing is skipped."""

from __future__ import annotations

import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from harness import DECISION_TTL, ImageFile, Imgcache
from netlink.link import Network
from relay import Relay
from stack import Clients, Stack, User


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Keystone and Glance, started once; a failure to start fails the tests, with the reason."""
    began = time.monotonic()
    try:
        server = Stack(tmp_path_factory.mktemp("openstack"))
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        message = f"the OpenStack stack did not start: {exc}"
        raise pytest.fail.Exception(message, pytrace=False) from None
    print(f"\nOpenStack stack up in {time.monotonic() - began:.1f} s: {server.timings}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def relay(stack: Stack, network: Network) -> Iterator[Relay]:
    """A relay in front of Glance at the far end of the test network, for imgcache to use as
    its upstream: imgcache -> link -> relay -> Glance (on loopback)."""
    assert stack.glance is not None
    server = Relay(stack.glance.port, listener=network.listen(), host=network.far_host)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def clients(stack: Stack) -> Iterator[Clients]:
    """python-glanceclient and openstacksdk, run as subprocesses in the OpenStack venv; any
    still running when the test ends are killed."""
    runner = Clients(stack)
    try:
        yield runner
    finally:
        runner.stop_all()


@pytest.fixture
def imgcache(relay: Relay, tmp_path: pathlib.Path) -> Iterator[Imgcache]:
    """A fresh imgcache in front of Glance (through the relay), decision TTL 2 s; its log is
    printed when the test fails."""
    server = Imgcache(relay.url, tmp_path / "cache",
                      extra=("--decision-ttl", f"{DECISION_TTL}s", "--log-level", "info"))
    try:
        yield server
    finally:
        relay.release()
        print(f"--- imgcache log:\n{server.stop()}")


@pytest.fixture
def alice(stack: Stack) -> User:
    """A member of project alpha."""
    return stack.alice


@pytest.fixture
def bob(stack: Stack) -> User:
    """A member of project beta."""
    return stack.bob


@pytest.fixture
def image_file(tmp_path: pathlib.Path) -> Callable[[int], ImageFile]:
    """Make random image files: ``image_file(size)``."""
    counter = iter(range(1000))

    def make(size: int) -> ImageFile:
        return ImageFile(tmp_path / f"image-{next(counter)}.raw", size)

    return make
