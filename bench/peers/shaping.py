"""Holding the Glance stand-in's bandwidth to a compute node's link (1 or 10 Gbit/s).

A compute node's link to Glance is one pipe shared by every download of that node, so a
cache that fetches an image 32 times shares it 32 ways. That is modelled with tc on the
loopback device: an HTB root qdisc whose classes cap the traffic *sent from* one stand-in
port each (a u32 filter on the source port); every other packet on lo is unclassified and
goes out through HTB's direct queue, unshaped. Needs root and tc (iproute2); otherwise, or
when lo already carries a qdisc that is not ours, the caller falls back to nginx's
per-connection ``limit_rate`` (which gives each upstream connection a link of its own, so
it favours caches that download an image several times).

The qdisc is removed when the run ends; one left by a run killed with -9 is removed by the
next run (the marker file names the owner's pid).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

from bench.common.installs import find_program
from bench.common.procs import pid_alive

#: HTB handle of our root qdisc on lo (hex), to tell it from anyone else's.
HANDLE = "1e5c"
#: Name of the storm link with no bit rate: a stand-in port with no class, so its packets
#: take HTB's direct queue, at loopback speed.
UNSHAPED = "lo"


def _tc(*args: str, check: bool = True) -> str:
    done = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _root_qdisc() -> str:
    """The first line of ``tc qdisc show dev lo`` for the root qdisc ("" if none)."""
    for line in _tc("qdisc", "show", "dev", "lo", check=False).splitlines():
        if " root " in line:
            return line
    return ""


def _ours(line: str) -> bool:
    return line.startswith(f"qdisc htb {HANDLE}: root")


def sweep_stale(marker: Path) -> None:
    """Remove the qdisc of an earlier run that died without removing it."""
    if not marker.exists():
        return
    match = re.match(r"(\d+)", marker.read_text())
    if match and pid_alive(int(match.group(1))):
        return
    if os.geteuid() == 0 and find_program("tc") and _ours(_root_qdisc()):
        _tc("qdisc", "del", "dev", "lo", "root", check=False)
    marker.unlink(missing_ok=True)


def tc_usable(marker: Path) -> tuple[bool, str]:
    """Whether links can be shaped with tc here; if not, why."""
    if os.geteuid() != 0:
        return False, "not root"
    if not find_program("tc"):
        return False, "tc (iproute2) is not installed"
    sweep_stale(marker)
    root = _root_qdisc()
    if root and not root.startswith("qdisc noqueue"):
        return False, f"lo already has a root qdisc ({root.strip()})"
    return True, ""


class LinkShaper:
    """HTB classes on lo, one per stand-in port, each capped at its rate."""

    def __init__(self, marker: Path) -> None:
        self._marker = marker
        self._added = False

    def start(self, rates: dict[int, int]) -> None:
        """Cap the bytes sent from each port of ``rates`` ({port: bits per second})."""
        self._marker.parent.mkdir(parents=True, exist_ok=True)
        self._marker.write_text(f"{os.getpid()}\n")
        _tc("qdisc", "add", "dev", "lo", "root", "handle", f"{HANDLE}:", "htb")
        self._added = True
        for minor, (port, bits) in enumerate(sorted(rates.items()), start=16):
            # Bucket depth: 2 ms at the rate (at least 128 KiB); one class per level, so
            # the quantum only has to be valid.
            burst = max(128 << 10, bits // 8 // 500)
            _tc("class", "add", "dev", "lo", "parent", f"{HANDLE}:", "classid",
                f"{HANDLE}:{minor:x}", "htb", "rate", f"{bits}bit", "ceil", f"{bits}bit",
                "burst", str(burst), "cburst", str(burst), "quantum", "200000")
            _tc("filter", "add", "dev", "lo", "parent", f"{HANDLE}:", "protocol", "ip",
                "prio", "1", "u32", "match", "ip", "sport", str(port), "0xffff",
                "flowid", f"{HANDLE}:{minor:x}")

    def stop(self) -> None:
        """Remove the qdisc (and with it the classes and filters)."""
        if self._added and _ours(_root_qdisc()):
            _tc("qdisc", "del", "dev", "lo", "root", check=False)
        self._added = False
        with contextlib.suppress(OSError):
            self._marker.unlink()
