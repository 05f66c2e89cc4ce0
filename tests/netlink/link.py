"""The test network: an emulated link to a network namespace, or loopback when no link can be
made. Tests put the far end of what imgcache talks to (the Glance stand-in, the interop relay,
a real Glance) behind ``Network.listen()`` and its hosts, and run the same either way.

A ``Link`` is a network namespace ``wire-<pid>-<start time>`` (the owning process, so that a
later run can tell a dead run's leftovers from a live run's link) holding one end of a
point-to-point pair of TUN devices; ``forwarder.py`` moves the packets between the two ends with
netem-like delay, jitter and reordering (why not netem itself: see forwarder.py). Addresses come
from 100.64.0.0/10 (RFC 6598's shared space, unused here), one /29 per link, chosen by the
owner's pid and checked against every address and route already in use.

Teardown holds when a run dies: the TUN devices disappear with the forwarder, which exits as soon
as its stdin (a pipe from the owner) closes; the namespace is removed by ``Link.close()`` and, if
the owner was killed first, by ``sweep()`` at the start of the next run.

Needs root, /dev/net/tun and iproute2 (``ip``); everything else is the standard library.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from netlink.forwarder import LinkSettings, set_netns

FORWARDER_PY = Path(__file__).with_name("forwarder.py")
NETNS_PREFIX = "wire-"
_NETNS_NAME = re.compile(r"^wire-(\d+)-(\d+)$")
_DEVICE_NAME = re.compile(r"^wire([0-9a-f]+)h$")
_POOL = ipaddress.ip_network("100.64.0.0/10")
_T = TypeVar("_T")


class LinkError(RuntimeError):
    """The emulated link could not be made (the message says why)."""


class Network(Protocol):
    """Where a test's far end listens, and how the near end reaches it."""

    far_host: str  # the far end's address, as a URL host
    far_alias: str  # another name for the same far end (a second upstream URL)
    kind: str  # "link" or "loopback"

    def listen(self, port: int = 0) -> socket.socket:
        """A listening TCP socket at the far end (blocks briefly: not on an event loop)."""
        ...

    async def listen_async(self, port: int = 0) -> socket.socket:
        """``listen()`` for coroutines."""
        ...

    def command_prefix(self) -> tuple[str, ...]:
        """A command prefix that runs a program at the far end (empty on loopback)."""
        ...

    def describe(self) -> str:
        """One line saying what the network is."""
        ...

    def close(self) -> None:
        """Tear the network down; idempotent."""
        ...


class Loopback:
    """The fallback network: everything on 127.0.0.1, with the reason the link is missing."""

    kind = "loopback"
    far_host = "127.0.0.1"
    far_alias = "localhost"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def listen(self, port: int = 0) -> socket.socket:
        """A listening socket on 127.0.0.1."""
        return socket.create_server((self.far_host, port), backlog=128)

    async def listen_async(self, port: int = 0) -> socket.socket:
        """``listen()`` in a worker thread."""
        return await asyncio.to_thread(self.listen, port)

    def command_prefix(self) -> tuple[str, ...]:
        """Nothing: programs run here."""
        return ()

    def describe(self) -> str:
        """Says it is loopback, and why."""
        return f"loopback only ({self.reason})"

    def close(self) -> None:
        """Nothing to tear down."""


def _listener(port: int) -> socket.socket:
    return socket.create_server(("0.0.0.0", port), backlog=128)


def ip(*args: str, netns: str | None = None) -> str:
    """Run ``ip [-n NETNS] ARGS`` and return its output; raise LinkError with its message."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if run.returncode != 0:
        raise LinkError(f"{' '.join(cmd)}: {run.stderr.strip() or f'exit {run.returncode}'}")
    return run.stdout


def process_start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), which
    tells it apart from a later process given the same pid; None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _devices() -> list[str]:
    return [entry["ifname"] for entry in json.loads(ip("-j", "link", "show") or "[]")]


def sweep() -> list[str]:
    """Remove the namespaces and devices of links whose owner is gone (a killed run's); a live
    run's link is left alone. Returns what was removed."""
    removed, owners = [], set()
    for name in _namespaces():
        match = _NETNS_NAME.match(name)
        if match is None:
            continue
        pid, start = int(match.group(1)), match.group(2)
        if process_start_time(pid) == start:
            owners.add(pid)
            continue
        with contextlib.suppress(LinkError):  # another run's sweep may have been quicker
            ip("netns", "delete", name)
            removed.append(f"netns {name}")
    for name in _devices():
        match = _DEVICE_NAME.match(name)
        if match is not None and int(match.group(1), 16) not in owners:
            with contextlib.suppress(LinkError):
                ip("link", "delete", name)
                removed.append(f"device {name}")
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address and route of this namespace, as networks."""
    used = []
    for entry in json.loads(ip("-j", "-4", "addr", "show") or "[]"):
        for addr in entry.get("addr_info", []):
            for key in ("local", "address"):
                if key in addr:
                    used.append(ipaddress.ip_network(addr[key]))
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            used.append(ipaddress.ip_network(dst, strict=False))
    return used


def pick_subnet(pid: int, used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A /29 of 100.64.0.0/10 for the link of process ``pid`` that overlaps nothing in
    ``used``: the pid's own slot or, if that one is taken, the next free one."""
    used = list(used)
    subnets = 1 << (29 - _POOL.prefixlen)
    for step in range(subnets):
        index = (pid + step) % subnets
        subnet = ipaddress.ip_network(f"{_POOL.network_address + index * 8}/29")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise LinkError("no free /29 left in 100.64.0.0/10")


def link_unavailable(environ: Mapping[str, str]) -> str | None:
    """Why a link cannot be made here (None if it can be tried)."""
    if environ.get("TEST_NETWORK", "link") == "loopback":
        return "TEST_NETWORK=loopback"
    if os.geteuid() != 0:
        return "not root: network namespaces and TUN devices need root"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "no usable /dev/net/tun"
    if shutil.which("ip") is None:
        return "no ip command (install iproute2)"
    return None


class Link:
    """An emulated link from this namespace to a namespace of its own (see the module's
    docstring); ``open()`` makes it, ``close()`` removes it."""

    kind = "link"

    def __init__(self, settings: LinkSettings | None = None) -> None:
        self.settings = settings or LinkSettings()
        pid = os.getpid()
        self.netns = f"{NETNS_PREFIX}{pid}-{process_start_time(pid)}"
        self.near_device = f"wire{pid:x}h"
        self.far_device = f"wire{pid:x}n"
        self.near_host = self.far_host = self.far_alias = ""
        self.swept: list[str] = []
        self._forwarder: subprocess.Popen[str] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> Link:
        """Sweep dead runs' links, then make this one and check a connection crosses it;
        raise LinkError (having removed whatever was made) if any step fails."""
        self.swept = sweep()
        atexit.register(self.close)
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        subnet = pick_subnet(os.getpid(), _used_networks())
        near, far, alias = (str(subnet.network_address + n) for n in (1, 2, 3))
        ip("netns", "add", self.netns)
        ip("link", "set", "lo", "up", netns=self.netns)
        self._start_forwarder()
        for device, netns in ((self.near_device, None), (self.far_device, self.netns)):
            ip("link", "set", device, "addrgenmode", "none", netns=netns)  # no IPv6 chatter
            ip("link", "set", device, "mtu", str(self.settings.mtu), "txqueuelen", "1000",
               netns=netns)
        ip("addr", "add", f"{near}/32", "peer", str(subnet), "dev", self.near_device)
        ip("addr", "add", f"{far}/32", "peer", f"{near}/32", "dev", self.far_device,
           netns=self.netns)
        ip("addr", "add", f"{alias}/32", "dev", self.far_device, netns=self.netns)
        ip("link", "set", self.far_device, "up", netns=self.netns)
        ip("link", "set", self.near_device, "up")
        self.near_host, self.far_host, self.far_alias = near, far, alias
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="wire-netns", initializer=self._enter_namespace)
        self._check()

    def _start_forwarder(self) -> None:
        settings = dataclasses.asdict(self.settings)
        # stdin is a pipe kept open by this process only: when it dies, the forwarder exits.
        self._forwarder = subprocess.Popen(
            [sys.executable, str(FORWARDER_PY), "--near", self.near_device,
             "--far", self.far_device, "--netns", f"/run/netns/{self.netns}",
             "--settings", json.dumps(settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        assert self._forwarder.stdout is not None
        line = self._forwarder.stdout.readline()
        if line.strip() != "ready":
            assert self._forwarder.stderr is not None
            raise LinkError(f"the link's forwarder did not start: {self._forwarder.stderr.read()}")

    def _enter_namespace(self) -> None:
        fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            set_netns(fd)
        finally:
            os.close(fd)

    def _check(self) -> None:
        """Fail with the reason unless a TCP connection and its bytes cross the link."""
        listener = self.listen()
        try:
            listener.settimeout(10)
            port = listener.getsockname()[1]
            with socket.create_connection((self.far_host, port), timeout=10) as client:
                server, _ = listener.accept()
                with server:
                    client.sendall(b"ping")
                    if server.recv(4) != b"ping":
                        raise LinkError("bytes sent across the link did not arrive")
        except OSError as exc:
            raise LinkError(f"no TCP connection across the link: {exc}") from exc
        finally:
            listener.close()

    def close(self) -> None:
        """Stop the forwarder (its devices go with it) and remove the namespace; idempotent."""
        atexit.unregister(self.close)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._forwarder is not None:
            forwarder, self._forwarder = self._forwarder, None
            assert forwarder.stdin is not None
            with contextlib.suppress(OSError):
                forwarder.stdin.close()
            try:
                forwarder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                forwarder.kill()
                forwarder.wait()
            for stream in (forwarder.stdout, forwarder.stderr):
                if stream is not None:
                    stream.close()
        if self.netns in _namespaces():
            ip("netns", "delete", self.netns)

    # -- using it ----------------------------------------------------------------------------

    def in_namespace(self, func: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        """Run ``func(*args)`` on a thread that lives in the far namespace (sockets it makes
        stay there for good); its future."""
        if self._pool is None:
            raise LinkError("the link is not open")
        self._check_forwarder()
        return self._pool.submit(func, *args)

    def _check_forwarder(self) -> None:
        """Raise LinkError if the forwarder has died: nothing crosses the link any more."""
        forwarder = self._forwarder
        if forwarder is None or forwarder.poll() is not None:
            code = forwarder.returncode if forwarder is not None else None
            raise LinkError(f"the link's forwarder has exited (code {code})")

    def listen(self, port: int = 0) -> socket.socket:
        """A listening TCP socket in the far namespace, on all its addresses."""
        return self.in_namespace(_listener, port).result()

    async def listen_async(self, port: int = 0) -> socket.socket:
        """``listen()`` for coroutines (the loop does not wait on a lock)."""
        return await asyncio.wrap_future(self.in_namespace(_listener, port))

    def command_prefix(self) -> tuple[str, ...]:
        """``ip netns exec NETNS``: runs a program in the far namespace."""
        return ("ip", "netns", "exec", self.netns)

    def stats(self) -> dict[str, Any]:
        """The forwarder's counters, each way: packets, bytes, largest packet, reorders..."""
        self._check_forwarder()
        forwarder = self._forwarder
        assert forwarder is not None and forwarder.stdin and forwarder.stdout
        forwarder.stdin.write("stats\n")
        forwarder.stdin.flush()
        answer: dict[str, Any] = json.loads(forwarder.stdout.readline())
        return answer

    def describe(self) -> str:
        """The link's namespace, addresses and settings."""
        return (f"emulated link {self.near_host} <-> {self.far_host} (netns {self.netns}): "
                f"{self.settings.describe()}")
