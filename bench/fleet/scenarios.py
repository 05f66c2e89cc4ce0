"""The fleet benchmark's scenarios, tier engines and the record of one storm."""

from __future__ import annotations

from dataclasses import dataclass

from fleetsim import Storm

DIRECT, TIER, KILLED = "without tier", "through the tier", "tier node killed mid-way"
SCENARIOS = (DIRECT, TIER, KILLED)
ENGINE_NAMES = {"trafficserver": "Traffic Server", "squid": "Squid"}


@dataclass
class Run:
    """One storm and the machine's CPU use during it."""

    engine: str
    round: int
    storm: Storm
    cpu_busy: float  # fraction of all CPUs busy during the storm
