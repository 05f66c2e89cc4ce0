"""A rack on one machine: network namespaces for Glance, the tier nodes and the compute
nodes, each joined to one bridge (the rack's switch, in a namespace of its own) by a veth
pair whose two ends are shaped with HTB, so that every member has a link of its own speed in
each direction (this kernel has no netem: no added delay, no loss).

Namespaces and interfaces are named ``<prefix>-<member>`` (prefix ``fl...``: the fleet
work's own); ``Rack.down`` deletes them all, and ``Rack.up`` first removes any left by an
earlier run with the same prefix that was killed. Needs root, ``ip`` and ``tc``."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

#: The rack's addresses (inside its namespaces only: nothing outside sees them).
SUBNET = ipaddress.ip_network("10.211.0.0/16")
GLANCE_PORT = 9292
TIER_PORT = 3128


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def netns_usable(prefix: str = "fl") -> tuple[bool, str]:
    """Whether racks can be built here (a namespace ``<prefix>-probe`` is made and
    removed to find out); if not, why."""
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"{tool} (iproute2) is not installed"
    probe = f"{prefix}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return False, f"ip netns add failed: {made.stderr.strip()}"
    return True, ""


@dataclass(frozen=True)
class Member:
    """One machine of the rack: its namespace, address and link speed (bits/s)."""

    ns: str
    ip: str
    rate: int

    def run(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside this member's namespace."""
        return ["ip", "netns", "exec", self.ns, *cmd]


class Rack:
    """Glance, ``tiers`` tier nodes and ``nodes`` compute nodes on one shaped switch."""

    def __init__(self, prefix: str, *, nodes: int, tiers: int, node_rate: int,
                 tier_rate: int, glance_rate: int) -> None:
        hosts = SUBNET.hosts()
        next(hosts)
        address = lambda: str(next(hosts))  # noqa: E731
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.glance = Member(f"{prefix}-g", address(), glance_rate)
        self.tiers = [Member(f"{prefix}-t{i}", address(), tier_rate) for i in range(tiers)]
        self.nodes = [Member(f"{prefix}-n{i:02d}", address(), node_rate)
                      for i in range(nodes)]

    @property
    def members(self) -> list[Member]:
        """Every machine of the rack."""
        return [self.glance, *self.tiers, *self.nodes]

    @property
    def glance_url(self) -> str:
        """https Glance's base URL (certificate for its address)."""
        return f"https://{self.glance.ip}:{GLANCE_PORT}"

    @property
    def tier_urls(self) -> list[str]:
        """The tier nodes' base URLs, for [tier] urls."""
        return [f"http://{t.ip}:{TIER_PORT}" for t in self.tiers]

    @property
    def compute_net(self) -> str:
        """The rack's subnet, for the tier's ACLs (the compute nodes' network)."""
        return str(SUBNET)

    def up(self) -> None:
        """Create the namespaces, links, addresses and shaping (removing stale ones)."""
        self.down()
        try:
            _run("ip", "netns", "add", self.switch)
            sw = ["ip", "netns", "exec", self.switch]
            bridge = f"{self.prefix}br"
            _run(*sw, "ip", "link", "add", bridge, "type", "bridge")
            _run(*sw, "ip", "link", "set", bridge, "up")
            for member in self.members:
                self._join(member, bridge)
        except BaseException:
            self.down()
            raise

    def _join(self, member: Member, bridge: str) -> None:
        _run("ip", "netns", "add", member.ns)
        inside, outside = member.ns, f"{member.ns}s"
        _run("ip", "link", "add", inside, "netns", member.ns, "type", "veth", "peer", "name",
             outside, "netns", self.switch)
        sw = ["ip", "netns", "exec", self.switch]
        _run(*sw, "ip", "link", "set", outside, "master", bridge)
        _run(*sw, "ip", "link", "set", outside, "up")
        ns = ["ip", "netns", "exec", member.ns]
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run(*ns, "ip", "addr", "add", f"{member.ip}/{SUBNET.prefixlen}", "dev", inside)
        _run(*ns, "ip", "link", "set", inside, "up")
        _shape(ns, inside, member.rate)  # what the member sends
        _shape(sw, outside, member.rate)  # what it receives

    def down(self) -> None:
        """Delete every namespace of this prefix (their links go with them)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=False).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.split() else ""
            if name == self.switch or name.startswith(f"{self.prefix}-"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def tx_bytes(self, member: Member) -> int:
        """Bytes ``member`` has sent on its link (its egress, headers included)."""
        return int(_run(*member.run(["cat", f"/sys/class/net/{member.ns}/statistics/tx_bytes"])))


def _shape(ns: list[str], device: str, rate: int) -> None:
    """Hold what ``device`` sends to ``rate`` bits/s: one HTB class, a bucket of 2 ms at the
    rate (at least 256 KiB, so that 64 KiB GSO segments pass)."""
    burst = max(256 << 10, rate // 8 // 500)
    _run(*ns, "tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "1")
    _run(*ns, "tc", "class", "add", "dev", device, "parent", "1:", "classid", "1:1", "htb",
         "rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", str(burst), "cburst", str(burst),
         "quantum", "200000")
