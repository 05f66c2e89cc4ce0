"""The fleet benchmark: one cold image booted on every compute node of a simulated rack at
once, without the shared tier, through it, and through it with the image's tier node killed
mid-way, for each tier engine, every round in the same run.

The rack (tests/netsim.py, tests/fleetsim.py) is network namespaces on one machine: an https
Glance stand-in on a 1 Gbit/s link, tier nodes (Traffic Server or Squid, from config/tier/)
and compute nodes on 10 Gbit/s links, all on one bridge, shaped with HTB (no netem on this
kernel: no added delay). Each compute node runs its own ``imgcache serve`` and several curl
clients. Reported, per scenario, medians over the rounds: Glance's egress (its link's
counter), the wall time until the last node is done, clients' time to first byte; ratios to
the same round's storm without the tier. Writes bench/results/fleet.md and fleet.png.

Needs root, iproute2, curl, and squid and trafficserver from Debian (installed when missing).

    .venv/bin/python -m bench.fleet.run                    # 16 nodes, 256 MiB, 3 rounds
    .venv/bin/python -m bench.fleet.run --nodes 4 --size 64M --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fleetsim import Fleet
from netsim import Rack, netns_usable

from bench.common.images import human_size
from bench.common.installs import ensure_matplotlib, find_or_install
from bench.common.lifecycle import argument_parser, progress
from bench.common.paths import REPO, RESULTS
from bench.common.procs import machine_cpu, run_text
from bench.common.report_parts import machine_details
from bench.fleet.report import chart, checks, report
from bench.fleet.scenarios import DIRECT, ENGINE_NAMES, KILLED, SCENARIOS, Run
from imgcache.config import parse_size

_PACKAGES = {"trafficserver": ("traffic_server", "trafficserver"), "squid": ("squid", "squid")}


def parse_rate(text: str) -> int:
    """``10gbit``, ``400mbit`` or plain bits per second."""
    value = text.strip().lower()
    for unit, factor in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if value.endswith(unit):
            return int(float(value.removesuffix(unit)) * factor)
    return int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--nodes", type=int, default=16, help="compute nodes (16)")
    parser.add_argument("--tiers", type=int, default=2, help="tier nodes (2)")
    parser.add_argument("--clients", type=int, default=4, help="booting clients per node (4)")
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"),
                        help="image size (256M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per engine (3)")
    parser.add_argument("--engines", default="trafficserver,squid",
                        help="tier engines, comma-separated (trafficserver,squid)")
    parser.add_argument("--node-rate", type=parse_rate, default=parse_rate("10gbit"))
    parser.add_argument("--tier-rate", type=parse_rate, default=parse_rate("10gbit"))
    parser.add_argument("--glance-rate", type=parse_rate, default=parse_rate("1gbit"))
    parser.add_argument("--cache-root", type=Path, default=Path("/dev/shm"),
                        help="where the nodes' caches go (a tmpfs: /dev/shm)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINE_NAMES)
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}")
    if min(args.nodes, args.tiers, args.clients, args.rounds) < 1:
        parser.error("--nodes, --tiers, --clients and --rounds must be >= 1")
    if args.tiers < 2:
        parser.error("--tiers must be >= 2: a tier node is killed in one scenario")
    return args


def run_engine(args: argparse.Namespace, engine: str) -> list[Run]:
    """Every round of the three scenarios with ``engine`` as the tier."""
    rack = Rack(f"flb{engine[0]}", nodes=args.nodes, tiers=args.tiers,
                node_rate=args.node_rate, tier_rate=args.tier_rate,
                glance_rate=args.glance_rate)
    fleet = Fleet(rack, engine=engine, image_size=args.size, images=3 * args.rounds,
                  clients_per_node=args.clients, cache_root=args.cache_root)
    progress(f"{ENGINE_NAMES[engine]}: building the rack ({args.nodes} nodes, {args.tiers} "
             f"tier nodes) and {3 * args.rounds} images of {human_size(args.size)}")
    fleet.start()
    runs: list[Run] = []
    try:
        images = iter(fleet.images)
        for number in range(1, args.rounds + 1):
            order = SCENARIOS if number % 2 else SCENARIOS[::-1]
            for scenario in order:
                fleet.start_imgcaches(with_tier=scenario != DIRECT)
                image = next(images)
                busy_before, total_before = machine_cpu()
                storm = fleet.storm(scenario, image, kill_primary=scenario == KILLED)
                busy, total = machine_cpu()
                runs.append(Run(engine, number, storm,
                                (busy - busy_before) / max(1e-9, total - total_before)))
                progress(f"{ENGINE_NAMES[engine]} round {number} {scenario}: wall "
                         f"{storm.wall:.1f} s, Glance sent {storm.glance_egress / args.size:.2f}"
                         f" images, {len(storm.failed)} clients failed")
                if scenario == KILLED:
                    fleet.restart_tier(fleet.primary(image))
        fleet.stop_imgcaches()
    finally:
        fleet.close()
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    usable, why = netns_usable()
    if not usable:
        print(f"bench.fleet needs network namespaces: {why}", file=sys.stderr)
        return 2
    for engine in args.engines:
        find_or_install(*_PACKAGES[engine])
    ensure_matplotlib()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    started = time.monotonic()
    for engine in args.engines:
        runs += run_engine(args, engine)
    problems = checks(runs, args)
    versions = [item for item in machine_details("nginx", REPO) if item[0] != "nginx"]
    versions += [("Traffic Server", run_text(["traffic_server", "-V"]).splitlines()[-1]
                  if "trafficserver" in args.engines else "-"),
                 ("Squid", (run_text(["squid", "-v"]) or "?").splitlines()[0]
                  if "squid" in args.engines else "-"),
                 ("run time", f"{time.monotonic() - started:.0f} s")]
    text = report(runs, args, problems, versions)
    (args.output_dir / "fleet.md").write_text(text)
    chart(runs, args.engines, args.output_dir / "fleet.png")
    print(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
