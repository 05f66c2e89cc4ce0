"""The markdown report: medians, same-run ratios, checks, raw samples, machine details."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

from images import human_size
from measure import IMGCACHE, NGINX, Checks, HitResults, StormResults
from procs import run_text


def machine_details(nginx_binary: str, repo: Path) -> list[tuple[str, str]]:
    """(name, value) pairs describing where the run happened."""
    return [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("cpus (nproc)", str(len(os.sched_getaffinity(0)))),
        ("cpu model", _cpu_model()),
        ("memory", _memory()),
        ("kernel", platform.release()),
        ("python", sys.version.split()[0]),
        ("nginx", run_text([nginx_binary, "-v"]).removeprefix("nginx version: ")),
        ("curl", run_text(["curl", "--version"]).splitlines()[0] if run_text(
            ["curl", "--version"]) else "?"),
        ("imgcache commit", run_text(["git", "-C", str(repo), "describe", "--always",
                                      "--dirty"]) or "?"),
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "?"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def hit_rows(hits: HitResults) -> list[list[str]]:
    """Table rows for the cache-hit measurements."""
    one_i, one_n = _median(hits.single_mbps[IMGCACHE]), _median(hits.single_mbps[NGINX])
    wall_i = _median(hits.concurrent_wall[IMGCACHE])
    wall_n = _median(hits.concurrent_wall[NGINX])
    total_mb = hits.clients * hits.size / 1e6
    agg_i, agg_n = total_mb / wall_i, total_mb / wall_n
    size = human_size(hits.size)
    return [
        [f"Hit, 1 client, {size}: MB/s", f"{one_i:.0f}", f"nginx {one_n:.0f}",
         f"**{one_i / one_n:.2f}**", "higher"],
        [f"Hit, {hits.clients} concurrent clients, {size} each: aggregate MB/s",
         f"{agg_i:.0f}", f"nginx {agg_n:.0f}", f"**{agg_i / agg_n:.2f}**", "higher"],
        [f"Hit, {hits.clients} concurrent clients: wall s until all finish",
         f"{wall_i:.2f}", f"nginx {wall_n:.2f}", f"{wall_i / wall_n:.2f}", "lower"],
    ]


def storm_rows(storm: StormResults) -> list[list[str]]:
    """Table rows for the cold-storm measurements."""
    walls = [r.wall for r in storm.reps]
    directs = [r.direct for r in storm.reps]
    wall, direct = _median(walls), _median(directs)
    ttfb_med = _median([_median(r.ttfbs) for r in storm.reps])
    ttfb_max = _median([max(r.ttfbs) for r in storm.reps])
    delivered = storm.clients * storm.size / 1e6 / wall
    gets = ", ".join(str(r.upstream_gets) for r in storm.reps)
    size = human_size(storm.size)
    return [
        [f"Cold storm, {storm.clients} clients, {size}: wall s until all finish",
         f"{wall:.2f}", f"1 direct download {direct:.2f}", f"**{wall / direct:.2f}**",
         "lower"],
        ["Cold storm: client time to first byte, median / max s",
         f"{ttfb_med:.3f} / {ttfb_max:.3f}", "", "", "lower"],
        ["Cold storm: MB/s delivered to all clients together", f"{delivered:.0f}",
         f"direct {storm.size / 1e6 / direct:.0f}", f"{delivered * direct / storm.size * 1e6:.2f}",
         "higher"],
        ["Cold storm: upstream data GETs per storm (must be 1)", gets, "", "", ""],
    ]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _checks_section(checks: Checks) -> str:
    rows = []
    for name in checks.names():
        failed = checks.failed[name]
        verdict = "ok" if not failed else f"**FAILED {failed}x**: {checks.first_failure[name]}"
        rows.append([name, str(checks.passed[name] + failed), verdict])
    return _table(["check", "count", "result"], rows)


def _samples_section(hits: HitResults | None, storm: StormResults | None) -> str:
    lines = []
    if hits:
        for name in (IMGCACHE, NGINX):
            lines.append(f"- hit 1 client, {name}, MB/s: "
                         f"{_spread(hits.single_mbps[name], '.0f')}")
        for name in (IMGCACHE, NGINX):
            lines.append(f"- hit {hits.clients} clients, {name}, wall s: "
                         f"{_spread(hits.concurrent_wall[name], '.2f')}")
    if storm:
        lines.append(f"- storm wall s: {_spread([r.wall for r in storm.reps], '.2f')}")
        lines.append(f"- direct download s: {_spread([r.direct for r in storm.reps], '.2f')}")
        lines.append("- storm TTFB max s: "
                     f"{_spread([max(r.ttfbs) for r in storm.reps], '.3f')}")
        lines.append("- storm X-Cache-Status: " + "; ".join(
            ", ".join(f"{k} {v}" for k, v in sorted(r.cache_statuses.items()))
            for r in storm.reps))
    return "\n".join(lines)


def render(hits: HitResults | None, storm: StormResults | None, checks: Checks,
           machine: list[tuple[str, str]], reps: int, command: str) -> str:
    """The whole markdown report."""
    rows = (hit_rows(hits) if hits else []) + (storm_rows(storm) if storm else [])
    verdict = "all checks passed" if not checks.failed else "**SOME CHECKS FAILED**"
    parts = [
        "# imgcache benchmark",
        "",
        f"`{command}`: medians of {reps} repetitions; every baseline was measured in the "
        f"same run, alternating with imgcache. MB = 10^6 bytes. Ratio = imgcache / baseline "
        f"(the last column says which way is better). {verdict}.",
        "",
        _table(["measurement", "imgcache", "baseline (same run)", "ratio", "better"], rows),
        "",
        "## Checks",
        "",
        _checks_section(checks),
        "",
        "## Samples (in run order)",
        "",
        _samples_section(hits, storm),
        "",
        "## Machine",
        "",
        "\n".join(f"- {name}: {value}" for name, value in machine),
        "",
    ]
    return "\n".join(parts)
