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

    .venv/bin/python bench/fleet.py                       # 16 nodes, 256 MiB, 3 rounds
    .venv/bin/python bench/fleet.py --nodes 4 --size 64M --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from debian import find_or_install  # noqa: E402
from fleetsim import Fleet, Storm  # noqa: E402
from images import human_size  # noqa: E402
from measure import progress  # noqa: E402
from netsim import Rack, netns_usable  # noqa: E402
from peers import ensure_matplotlib  # noqa: E402
from procs import machine_cpu, run_text  # noqa: E402
from report import machine_details  # noqa: E402
from report_parts import bullets, markdown_table, median  # noqa: E402

from imgcache.config import parse_size  # noqa: E402

RESULTS = REPO / "bench" / "results"
DIRECT, TIER, KILLED = "without tier", "through the tier", "tier node killed mid-way"
SCENARIOS = (DIRECT, TIER, KILLED)
ENGINE_NAMES = {"trafficserver": "Traffic Server", "squid": "Squid"}
_PACKAGES = {"trafficserver": ("traffic_server", "trafficserver"), "squid": ("squid", "squid")}


def parse_rate(text: str) -> int:
    """``10gbit``, ``400mbit`` or plain bits per second."""
    value = text.strip().lower()
    for unit, factor in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if value.endswith(unit):
            return int(float(value.removesuffix(unit)) * factor)
    return int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


@dataclass
class Run:
    """One storm and the machine's CPU use during it."""

    engine: str
    round: int
    storm: Storm
    cpu_busy: float  # fraction of all CPUs busy during the storm


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


# -- the report ------------------------------------------------------------------------------

def _ttfbs(storm: Storm) -> list[float]:
    return sorted(c.ttfb for c in storm.clients if c.status == 200)


def _pick(runs: list[Run], engine: str, scenario: str) -> list[Run]:
    return [r for r in runs if r.engine == engine and r.storm.scenario == scenario]


def _ratio(runs: list[Run], engine: str, scenario: str, metric: str) -> float:
    """Median over rounds of the scenario's metric divided by the same round's direct one."""
    ratios = []
    for run in _pick(runs, engine, scenario):
        (direct,) = [r for r in _pick(runs, engine, DIRECT) if r.round == run.round]
        ratios.append(_metric(run.storm, metric) / _metric(direct.storm, metric))
    return median(ratios)


def _metric(storm: Storm, metric: str) -> float:
    ttfb = _ttfbs(storm) or [float("nan")]
    return {
        "egress": storm.glance_egress / storm.image_size,
        "wall": storm.wall,
        "ttfb_median": median(ttfb),
        "ttfb_max": ttfb[-1],
        "first_node": min(storm.node_done),
    }[metric]


def summary_table(runs: list[Run], engines: list[str]) -> str:
    rows = []
    for engine in engines:
        for scenario in SCENARIOS:
            picked = _pick(runs, engine, scenario)
            if not picked:
                continue
            def med(metric: str, picked: list[Run] = picked) -> float:
                return median([_metric(r.storm, metric) for r in picked])
            failed = sum(len(r.storm.failed) for r in picked)
            clients = sum(len(r.storm.clients) for r in picked)
            wall_ratio = ("1 (baseline)" if scenario == DIRECT
                          else f"{_ratio(runs, engine, scenario, 'wall'):.2f}x")
            rows.append([
                ENGINE_NAMES[engine] if scenario == DIRECT else "", scenario,
                f"{med('egress'):.2f}", f"{med('wall'):.1f}", wall_ratio,
                f"{med('first_node'):.1f}", f"{med('ttfb_median'):.3f}", f"{med('ttfb_max'):.3f}",
                f"{failed} of {clients}",
                f"{median([r.cpu_busy for r in picked]) * 100:.0f} %"])
    return markdown_table(
        ["tier engine", "scenario", "Glance egress (images)", "wall until last node (s)",
         "wall vs without", "first node done (s)", "TTFB median (s)", "TTFB max (s)",
         "clients failed", "machine CPU busy"], rows)


def samples_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        storm = run.storm
        ttfb = _ttfbs(storm) or [float("nan")]
        tiers = ", ".join(f"{b / storm.image_size:.2f}" for b in storm.tier_egress)
        killed = f"{storm.killed} at {storm.killed_at:.1f} s" if storm.killed else ""
        rows.append([ENGINE_NAMES[run.engine], str(run.round), storm.scenario,
                     f"{storm.glance_egress:,}", tiers, f"{storm.wall:.2f}",
                     f"{min(storm.node_done):.2f}", f"{median(ttfb):.3f}", f"{ttfb[-1]:.3f}",
                     str(len(storm.failed)), killed])
    return markdown_table(["engine", "round", "scenario", "Glance egress (bytes)",
                           "tier nodes' egress (images)", "wall (s)", "first node (s)",
                           "TTFB median (s)", "TTFB max (s)", "failed", "killed"], rows)


def checks(runs: list[Run], args: argparse.Namespace) -> list[str]:
    """What must hold in every storm; a failed one is reported (and the exit status is 1)."""
    problems = []
    for run in runs:
        storm, label = run.storm, f"{run.engine} round {run.round} {run.storm.scenario}"
        if storm.failed:
            problems.append(f"{label}: {len(storm.failed)} clients failed: {storm.failed[:2]}")
        committed = storm.summed('imgcache_fills_total{outcome="committed"}')
        if committed != args.nodes:
            problems.append(f"{label}: {committed:.0f} fills committed, not {args.nodes}")
        if storm.summed("imgcache_checksum_failures_total"):
            problems.append(f"{label}: checksum failures")
        egress = storm.glance_egress / storm.image_size
        if storm.scenario == TIER and egress > 1.05:
            problems.append(f"{label}: Glance sent {egress:.2f} images, not 1")
        if storm.scenario == DIRECT and egress < args.nodes:
            problems.append(f"{label}: Glance sent {egress:.2f} images, fewer than nodes")
    return problems


def chart(runs: list[Run], engines: list[str], path: Path) -> None:
    """Glance's egress over time in the first round of each engine; wall times and times to
    first byte (medians over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(engines) + 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.4), squeeze=False)
    colors = {DIRECT: "#7f7f7f", TIER: "#1f77b4", KILLED: "#d62728"}
    for ax, engine in zip(axes[0], engines, strict=False):
        for scenario in SCENARIOS:
            picked = _pick(runs, engine, scenario)
            if not picked:
                continue
            storm = picked[0].storm
            xs = [t for t, _ in storm.glance_series]
            ys = [b / storm.image_size for _, b in storm.glance_series]
            ax.plot(xs, ys, label=f"{scenario} (last node {storm.wall:.1f} s)",
                    color=colors[scenario])
            ax.axvline(storm.wall, color=colors[scenario], linestyle=":", linewidth=1)
            if storm.killed:
                ax.axvline(storm.killed_at, color=colors[scenario], linestyle="--",
                           linewidth=1, label=f"tier node killed ({storm.killed_at:.1f} s)")
        ax.set_title(f"{ENGINE_NAMES[engine]} tier, round 1: Glance egress", fontsize=10)
        ax.set_xlabel("seconds since the storm began")
        ax.set_ylabel("images sent by Glance")
        ax.legend(fontsize=7)
    bars = ((axes[0][-2], (("wall", "wall until the last node"),),
             "Wall until the last node is done (s)"),
            (axes[0][-1], (("ttfb_median", "median"), ("ttfb_max", "max")),
             "Clients' time to first byte (s)"))
    for ax, metrics, title in bars:
        groups = [(engine, metric, label) for engine in engines for metric, label in metrics]
        width = 0.8 / len(groups)
        for g, (engine, metric, label) in enumerate(groups):
            heights = [median([_metric(r.storm, metric) for r in _pick(runs, engine, s)])
                       for s in SCENARIOS]
            offset = (g - (len(groups) - 1) / 2) * width
            ax.bar([i + offset for i in range(len(SCENARIOS))], heights, width,
                   label=f"{ENGINE_NAMES[engine]}: {label}")
        ax.set_xticks(range(len(SCENARIOS)), list(SCENARIOS), fontsize=8)
        ax.set_title(f"{title}, medians over rounds", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs: list[Run], args: argparse.Namespace, problems: list[str],
           versions: list[tuple[str, str]]) -> str:
    size = human_size(args.size)
    setup = [
        f"{args.nodes} compute nodes, each a network namespace with its own `imgcache serve` "
        f"and {args.clients} booting clients (curl, started at once); {args.tiers} tier "
        "nodes; one https Glance stand-in (`imgcache.standin`); all on one bridge",
        f"links (HTB on both ends of each veth, MTU 1500, no added delay): compute nodes "
        f"{args.node_rate / 1e9:g} Gbit/s, tier nodes {args.tier_rate / 1e9:g} Gbit/s, "
        f"Glance {args.glance_rate / 1e9:g} Gbit/s",
        f"one cold image of {size} (sha512 verified by every imgcache) per storm; a fresh "
        "image, fresh node caches (on tmpfs: here every node shares one disk) and the same "
        "tier nodes for every storm",
        "Glance egress: bytes Glance's link sent during the storm (TLS and HTTP framing "
        "included), in images; wall: from the first client started to the last one's end",
        f"{args.rounds} rounds per engine; scenario order flips every round; ratios are to "
        "the same round's storm without the tier",
        "killed: the image's tier node (rendezvous hashing) is killed with SIGKILL once "
        "Glance has sent half of the image",
        f"this machine's {len(os.sched_getaffinity(0))} cores are shared with other "
        f"sessions; every process of the rack ({args.nodes} imgcache, the tier, Glance, the "
        "clients, the bridge) competes for them",
    ]
    parts = [
        "# imgcache fleet: a cold image on every node of a rack, with and without the tier",
        "",
        "all checks passed" if not problems else "**SOME CHECKS FAILED**",
        "",
        "## Results (medians over rounds)",
        "",
        summary_table(runs, args.engines),
        "",
        "## Setup",
        "",
        bullets(setup),
        "",
    ]
    if problems:
        parts += ["## Failed checks", "", bullets(problems), ""]
    parts += ["## Samples (in run order)", "", samples_table(runs), "",
              "## Machine", "", bullets(f"{k}: {v}" for k, v in versions), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    usable, why = netns_usable()
    if not usable:
        print(f"bench/fleet.py needs network namespaces: {why}", file=sys.stderr)
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
