"""The emulated link (tests/netlink) does what the suites rely on, measured on the wire: no
packet larger than the MTU crosses it, round trips show its delay and jitter, some packets are
overtaken (UDP sequence numbers, and TCP's out-of-order queue at the far end), and a dead run's
link is cleaned away."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlink.link import Link, Network, ip, process_start_time, sweep

ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_STATISTICS = 263, 6
SO_RCVBUFFORCE = 33  # not in the socket module: SO_RCVBUF beyond rmem_max, for root
MiB = 1 << 20
TESTS = Path(__file__).parent


@pytest.fixture
def link(network: Network) -> Link:
    """The session's link (these tests are about it: on loopback there is none)."""
    if not isinstance(network, Link):
        pytest.skip(f"no emulated link in this run: {network.describe()}")
    return network


class Capture:
    """Every packet's length on one device, read from an AF_PACKET socket by a thread (as
    tcpdump would; the socket sees packets as the device sends and receives them)."""

    def __init__(self, sock: socket.socket, device: str) -> None:
        self.sock = sock
        self.device = device
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * MiB)
        sock.bind((device, 0))
        sock.settimeout(0.1)
        self.lengths: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = bytearray(256 * 1024)
        while not self._stop.is_set():
            try:
                # MSG_TRUNC: the packet's real length even if it did not fit the buffer.
                length, (device, *_) = self.sock.recvfrom_into(buffer, 0, socket.MSG_TRUNC)
            except TimeoutError:
                continue
            # Until bind() the socket sees every device's packets: keep only its own.
            if device == self.device:
                self.lengths.append(length)

    def stop(self) -> list[int]:
        """Stop capturing; the lengths seen (failing if the socket dropped any)."""
        self._stop.set()
        self._thread.join()
        _, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.sock.close()
        assert drops == 0, f"the capture missed {drops} packets"
        return self.lengths


def packet_socket() -> socket.socket:
    """An AF_PACKET socket for every protocol (in the namespace of the calling thread)."""
    return socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))


def exchange(listener: socket.socket, host: str, size: int) -> int:
    """Send ``size`` bytes to a server on ``listener`` and get ``size`` back over one TCP
    connection; the connection's MSS."""
    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            received = 0
            while received < size:
                received += len(conn.recv(MiB))
            conn.sendall(bytes(size))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with socket.create_connection((host, listener.getsockname()[1]), timeout=60) as client:
        client.sendall(os.urandom(size))
        received = 0
        while received < size:
            received += len(client.recv(MiB))
        mss = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    server.join(timeout=60)
    return mss


#: Bytes sent each way by the MTU test.
EXCHANGED = 4 * MiB


def test_no_packet_larger_than_the_mtu_crosses_the_link(link: Link) -> None:
    near = Capture(packet_socket(), link.near_device)
    far = Capture(link.in_namespace(packet_socket).result(), link.far_device)
    before = link.stats()
    # 4 MiB each way: about 9,000 packets, whose copies fit the capture sockets' 64 MiB
    # even when their reading threads get no CPU until the end (with 16 MiB, a loaded
    # machine made them drop some).
    with link.listen() as listener:
        mss = exchange(listener, link.far_host, EXCHANGED)
    near_lengths, far_lengths = near.stop(), far.stop()
    after = link.stats()

    assert mss == link.settings.mtu - 52  # 20 IP + 20 TCP + 12 timestamps
    for lengths in (near_lengths, far_lengths):
        assert sum(lengths) > 2 * EXCHANGED
        assert max(lengths) == link.settings.mtu  # full-size packets, and none larger
    for direction in ("near->far", "far->near"):
        assert after[direction]["max_packet"] <= link.settings.mtu
        assert after[direction]["sizes"].get(">1500", 0) == before[direction]["sizes"].get(
            ">1500", 0)


@pytest.mark.usefixtures("link")  # the control of the test above, where that one runs
def test_the_capture_sees_loopback_super_frames() -> None:
    # The same capture on loopback sees 64 KiB segments: it would see them on the link too.
    lo = Capture(packet_socket(), "lo")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        exchange(listener, "127.0.0.1", 16 * MiB)
    assert max(lo.stop()) > 16 * 1024


def udp_echo(sock: socket.socket, stop: threading.Event) -> None:
    """Answer every datagram on ``sock`` with itself until ``stop``."""
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        sock.sendto(data, peer)


@pytest.fixture
def far_udp(link: Link) -> Iterator[socket.socket]:
    """A UDP socket in the link's namespace, on all its addresses."""
    def bound() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        sock.bind(("0.0.0.0", 0))
        return sock

    sock = link.in_namespace(bound).result()
    yield sock
    sock.close()


def test_round_trips_show_the_delay_and_its_jitter(link: Link, far_udp: socket.socket) -> None:
    stop = threading.Event()
    echo = threading.Thread(target=udp_echo, args=(far_udp, stop), daemon=True)
    echo.start()
    rtts = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((link.far_host, far_udp.getsockname()[1]))
        probe.settimeout(2)
        for n in range(300):
            began = time.perf_counter()
            probe.send(n.to_bytes(4, "big"))
            while int.from_bytes(probe.recv(64), "big") != n:
                pass
            rtts.append(time.perf_counter() - began)
            time.sleep(0.002)
    stop.set()
    echo.join()
    s = link.settings
    quantiles = statistics.quantiles(rtts, n=20)
    p5, median, p95 = quantiles[0], statistics.median(rtts), quantiles[-1]
    shown = f"RTT min {min(rtts) * 1e3:.2f} p5 {p5 * 1e3:.2f} median {median * 1e3:.2f} " \
            f"p95 {p95 * 1e3:.2f} ms"
    # Two one-way delays, each delay +- jitter (uniform): the sum spreads over 4 x jitter. No
    # round trip beats the link's minimum; a busy machine adds to it, hence the loose ceiling.
    assert min(rtts) >= 2 * (s.delay - s.jitter), shown
    assert 2 * s.delay * 0.9 <= median <= 2 * (s.delay + s.jitter), shown
    assert p95 - p5 >= 1.5 * s.jitter, shown


def tcp_ext(link: Link) -> dict[str, int]:
    """The far namespace's TcpExt counters (/proc/net/netstat read inside it)."""
    text = subprocess.run([*link.command_prefix(), "cat", "/proc/net/netstat"],
                          capture_output=True, text=True, check=True).stdout
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def test_some_packets_are_overtaken(link: Link, far_udp: socket.socket) -> None:
    count = 3000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.connect((link.far_host, far_udp.getsockname()[1]))
        for n in range(count):
            sender.send(n.to_bytes(4, "big"))
            if n % 10 == 9:
                time.sleep(0.0005)
    arrived = []
    far_udp.settimeout(1)
    while len(arrived) < count:
        try:
            arrived.append(int.from_bytes(far_udp.recv(64), "big"))
        except TimeoutError:
            break
    overtaken = sum(1 for i, n in enumerate(arrived) if n < max(arrived[:i], default=-1))
    assert len(arrived) == count
    assert count * link.settings.reorder / 3 <= overtaken <= count * link.settings.reorder * 3

    # TCP sees it too: segments wait in the receiver's out-of-order queue.
    before = tcp_ext(link)["TCPOFOQueue"]
    with link.listen() as listener:
        exchange(listener, link.far_host, 8 * MiB)
    assert tcp_ext(link)["TCPOFOQueue"] > before


def dead_pid() -> tuple[int, str]:
    """The pid and start time of a process that has just exited."""
    proc = subprocess.Popen(["sleep", "60"])
    start = process_start_time(proc.pid)
    assert start is not None
    proc.kill()
    proc.wait()
    return proc.pid, start


def test_a_dead_runs_namespace_and_devices_are_swept(link: Link) -> None:
    pid, start = dead_pid()
    netns, device = f"wire-{pid}-{start}", f"wire{pid:x}h"
    ip("netns", "add", netns)
    ip("tuntap", "add", "dev", device, "mode", "tun")  # persistent: only a sweep removes it
    try:
        removed = sweep()
        assert f"netns {netns}" in removed and f"device {device}" in removed
        assert netns not in ip("netns", "list") and device not in ip("link", "show")
        assert link.netns in ip("netns", "list")  # a live run's link stays
        with link.listen() as listener:
            exchange(listener, link.far_host, MiB)
    finally:
        sweep()


def test_a_killed_run_leaves_nothing_a_sweep_does_not_remove(link: Link) -> None:
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from netlink.link import Link;"
              "link = Link().open(); print(link.netns, link.near_device, flush=True);"
              "time.sleep(120)")
    owner = subprocess.Popen([sys.executable, "-c", script, str(TESTS)], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert owner.stdout is not None
        netns, device = owner.stdout.readline().split()
        assert device in ip("link", "show") and netns in ip("netns", "list")
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while device in ip("link", "show"):  # the forwarder sees its stdin close, and exits
        assert time.monotonic() < deadline, f"{device} outlived its run"
        time.sleep(0.05)
    assert f"netns {netns}" in sweep()
    assert netns not in ip("netns", "list")
