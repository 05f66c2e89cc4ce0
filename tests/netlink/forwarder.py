"""The emulated link's wire: a userspace process that moves IP packets between two TUN devices
(one in the root network namespace, one in the link's namespace), holding each for a one-way
delay with jitter, letting a few be overtaken (reordering) and, optionally, capping the rate.

This stands in for ``tc qdisc ... netem``, which the CI kernel lacks (``Specified qdisc kind is
unknown``, no modules to load). TUN rather than a veth pair with an AF_PACKET bridge because a
TUN device opened without ``IFF_VNET_HDR`` has no segmentation offloads: the kernel hands this
process every packet cut to the device's MTU, and takes each packet written back as one packet
(no GRO merging), so what crosses here is what would cross a 1500-byte Ethernet wire. The
devices are not persistent: they vanish with this process, however it ends.

Standard library only, and self-contained: it runs as a script (``python forwarder.py ...``,
started by ``netlink.link.Link``), in its own process so that it never competes with the tests
for a GIL. It speaks on stdin/stdout: ``ready`` once both devices exist, one JSON line of
counters for each ``stats`` line read, and it exits when stdin closes (its parent is gone).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import struct
import sys
import time
from dataclasses import asdict, dataclass, field

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
_BATCH = 64  # packets read from one device before due packets are released again


@dataclass(frozen=True)
class LinkSettings:
    """What the link does to every packet, each way (netem's knobs, by the same names).

    Each packet waits ``delay`` plus a uniform random ``[-jitter, +jitter]``. Packets leave in
    the order they came (a FIFO wire: jitter alone does not reorder), except that a fraction
    ``reorder`` of them is held back ``reorder_gap`` more without holding up those behind it, so
    the next few overtake it. ``rate`` (bytes/s, None: as fast as this process goes) serializes
    packets as a slower wire would; ``queue_limit`` packets may wait each way, more are dropped.
    """

    mtu: int = 1500
    delay: float = 0.002
    jitter: float = 0.001
    reorder: float = 0.01
    reorder_gap: float = 0.001
    rate: float | None = None
    queue_limit: int = 5000
    seed: int | None = None

    def describe(self) -> str:
        """One line for logs, e.g. ``MTU 1500, one-way delay 2.0 ms ± 1.0 ms, ...``."""
        rate = f"{self.rate / 1e6:g} MB/s" if self.rate else "uncapped"
        return (f"MTU {self.mtu}, one-way delay {self.delay * 1e3:g} ms ± "
                f"{self.jitter * 1e3:g} ms, {self.reorder:.0%} of packets held back "
                f"{self.reorder_gap * 1e3:g} ms (reordered), rate {rate}")


@dataclass
class Counters:
    """What went one way through the link."""

    packets: int = 0
    bytes: int = 0
    max_packet: int = 0
    held_back: int = 0  # packets picked to be overtaken
    reordered: int = 0  # packets that left after a packet that came in after them
    dropped: int = 0  # over queue_limit, or refused by the receiving device
    sizes: dict[str, int] = field(default_factory=dict)  # "<=576", "<=1500", ">1500": packets


def _size_class(size: int) -> str:
    return "<=576" if size <= 576 else "<=1500" if size <= 1500 else ">1500"


class Direction:
    """One way through the link: packets read from ``src`` are written to ``dst``."""

    def __init__(self, name: str, src: int, dst: int, settings: LinkSettings,
                 rng: random.Random) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.settings = settings
        self.rng = rng
        self.counters = Counters()
        self.queued = 0
        self._fifo_floor = 0.0  # when the last in-order packet leaves: no one leaves before it
        self._wire_free = 0.0  # when the wire is free again, under a rate cap
        self._arrivals = 0
        self._last_left = -1  # arrival number of the latest-arrived packet that has left

    def schedule(self, now: float, size: int) -> tuple[float, int] | None:
        """When a packet of ``size`` bytes arriving ``now`` leaves, and its arrival number;
        None when the queue is full (the packet is dropped)."""
        s = self.settings
        self.counters.packets += 1
        self.counters.bytes += size
        self.counters.max_packet = max(self.counters.max_packet, size)
        size_class = _size_class(size)
        self.counters.sizes[size_class] = self.counters.sizes.get(size_class, 0) + 1
        if self.queued >= s.queue_limit:
            self.counters.dropped += 1
            return None
        sent = now
        if s.rate:
            sent = max(now, self._wire_free) + size / s.rate
            self._wire_free = sent
        leaves = sent + max(0.0, s.delay + self.rng.uniform(-s.jitter, s.jitter))
        if s.reorder and self.rng.random() < s.reorder:
            self.counters.held_back += 1
            leaves = max(leaves, self._fifo_floor) + s.reorder_gap
        else:
            leaves = max(leaves, self._fifo_floor)
            self._fifo_floor = leaves
        self.queued += 1
        self._arrivals += 1
        return leaves, self._arrivals

    def deliver(self, arrival: int, packet: bytes) -> None:
        """Write a due packet to the receiving device."""
        self.queued -= 1
        if arrival < self._last_left:
            self.counters.reordered += 1
        self._last_left = max(self._last_left, arrival)
        try:
            os.write(self.dst, packet)
        except OSError:  # the device is down or refused the packet: lost, as on a wire
            self.counters.dropped += 1


def open_tun(name: str) -> int:
    """Create the (non-persistent) TUN device ``name`` in this thread's network namespace and
    return its non-blocking descriptor; raw IP packets, no packet-information header."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def set_netns(fd: int) -> None:
    """Move the calling thread into the network namespace open on ``fd`` (setns(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def open_devices(near: str, far: str, netns_path: str) -> tuple[int, int]:
    """Create the ``near`` device here and the ``far`` one in the namespace at ``netns_path``."""
    near_fd = open_tun(near)
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    there = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        set_netns(there)
        try:
            far_fd = open_tun(far)
        finally:
            set_netns(home)
    finally:
        os.close(home)
        os.close(there)
    return near_fd, far_fd


class Forwarder:
    """The event loop: read packets as they come, write each when it is due."""

    def __init__(self, near_fd: int, far_fd: int, settings: LinkSettings) -> None:
        rng = random.Random(settings.seed)
        self.outbound = Direction("near->far", near_fd, far_fd, settings, rng)
        self.inbound = Direction("far->near", far_fd, near_fd, settings, rng)
        self._due: list[tuple[float, int, int, Direction, bytes]] = []
        self._ticket = 0

    def stats(self) -> dict[str, object]:
        """The counters of both directions."""
        return {d.name: asdict(d.counters) for d in (self.outbound, self.inbound)}

    def _read(self, direction: Direction) -> None:
        for _ in range(_BATCH):
            try:
                packet = os.read(direction.src, 65536)
            except BlockingIOError:
                return
            except OSError:  # the device went away: the link is being torn down
                raise SystemExit(0) from None
            scheduled = direction.schedule(time.monotonic(), len(packet))
            if scheduled is not None:
                self._ticket += 1
                leaves, arrival = scheduled
                heapq.heappush(self._due, (leaves, self._ticket, arrival, direction, packet))

    def _release(self) -> float | None:
        """Write every due packet; seconds until the next one is due (None: none waits)."""
        while self._due:
            wait = self._due[0][0] - time.monotonic()
            if wait > 0:
                return wait
            _, _, arrival, direction, packet = heapq.heappop(self._due)
            direction.deliver(arrival, packet)
        return None

    def run(self, control_in: int, control_out: int) -> None:
        """Forward until ``control_in`` closes, answering ``stats`` lines on ``control_out``."""
        # select(2), not epoll: its timeout has microseconds, epoll's whole milliseconds (which
        # would add up to 1 ms to every packet's delay).
        directions = {self.outbound.src: self.outbound, self.inbound.src: self.inbound}
        watched = [*directions, control_in]
        pending = b""
        while True:
            ready, _, _ = select.select(watched, [], [], self._release())
            for fd in ready:
                if fd in directions:
                    self._read(directions[fd])
                    continue
                data = os.read(control_in, 4096)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip() == b"stats":
                        os.write(control_out, json.dumps(self.stats()).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    """``forwarder.py --near DEV --far DEV --netns PATH --settings JSON``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--near", required=True, help="TUN device to create here")
    parser.add_argument("--far", required=True, help="TUN device to create in --netns")
    parser.add_argument("--netns", required=True, help="the far namespace, e.g. /run/netns/X")
    parser.add_argument("--settings", required=True, help="LinkSettings as JSON")
    args = parser.parse_args(argv)
    settings = LinkSettings(**json.loads(args.settings))
    near_fd, far_fd = open_devices(args.near, args.far, args.netns)
    forwarder = Forwarder(near_fd, far_fd, settings)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    forwarder.run(sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main()
