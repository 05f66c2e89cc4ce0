"""The ``network`` fixture (a pytest plugin, loaded by tests/conftest.py): one emulated link for
the whole session, or loopback when it cannot be made.

- ``TEST_NETWORK=loopback`` asks for loopback.
- Otherwise the link is made; if it cannot be (not root, no /dev/net/tun, an ``ip`` failure),
  every test using the network fails saying why when ``CI=true``, and elsewhere the tests run
  over loopback after one warning (a developer without root can still run them).

The run's last lines say which network the tests used and what the link's forwarder counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from netlink.link import Link, LinkError, Loopback, Network, link_unavailable

_RESULT = pytest.StashKey[list[str]]()


def _warn(config: pytest.Config, message: str) -> None:
    """Print ``message`` now, past pytest's output capture (fixtures run captured)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"WARNING: {message}", yellow=True, bold=True)


def open_network(config: pytest.Config) -> Network:
    """The link, or loopback with a warning; in CI a missing link fails the tests."""
    reason = link_unavailable(os.environ)
    if reason is None:
        try:
            return Link().open()
        except (LinkError, OSError) as exc:
            reason = f"the emulated link failed: {exc}"
    asked = os.environ.get("TEST_NETWORK") == "loopback"
    if not asked and os.environ.get("CI", "").lower() == "true":
        raise pytest.fail.Exception(
            f"CI must run the tests over the emulated link, and it cannot be made: {reason}",
            pytrace=False)
    if not asked:
        _warn(config, f"tests run over LOOPBACK only, not the emulated link: {reason}")
    return Loopback(reason)


def _summary(network: Network) -> list[str]:
    lines = [f"test network: {network.describe()}"]
    if isinstance(network, Link):
        if network.swept:
            lines.append(f"  swept from dead runs: {', '.join(network.swept)}")
        for direction, counts in network.stats().items():
            lines.append(f"  {direction}: {_counts(counts)}")
    return lines


def _counts(counts: dict[str, Any]) -> str:
    return (f"{counts['packets']} packets ({counts['bytes'] / 1e6:.1f} MB), largest "
            f"{counts['max_packet']} bytes, {counts['reordered']} reordered, "
            f"{counts['dropped']} dropped")


@pytest.fixture(scope="session")
def network(request: pytest.FixtureRequest) -> Iterator[Network]:
    """The network between imgcache and its far end (see the module's docstring)."""
    opened = open_network(request.config)
    try:
        yield opened
    finally:
        try:
            request.config.stash[_RESULT] = _summary(opened)
        finally:
            opened.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say which network the tests ran over, and what crossed the link."""
    lines = config.stash.get(_RESULT, None)
    if lines:
        terminalreporter.section("test network")
        for line in lines:
            terminalreporter.write_line(line, yellow=line.startswith("test network: loopback"))
