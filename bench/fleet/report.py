"""The fleet benchmark's report: medians over rounds and ratios to the same round's storm
without the tier, the checks every storm must pass, raw samples, and the PNG of Glance's
egress over time."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fleetsim import Storm

from bench.common.images import human_size
from bench.common.report_parts import bullets, markdown_table, median
from bench.fleet.scenarios import DIRECT, ENGINE_NAMES, KILLED, SCENARIOS, TIER, Run


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
