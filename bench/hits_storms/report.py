"""The core benchmark's markdown report: medians, same-run ratios, checks, raw samples."""

from __future__ import annotations

from bench.common.checks import Checks
from bench.common.images import human_size
from bench.common.report_parts import closing_sections, markdown_table, median, verdict
from bench.hits_storms.measure import IMGCACHE, NGINX, ColdResults, HitResults


def _spread(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def hit_rows(hits: HitResults) -> list[list[str]]:
    """Table rows for the cache-hit measurements."""
    one_i, one_n = median(hits.single_mbps[IMGCACHE]), median(hits.single_mbps[NGINX])
    wall_i = median(hits.concurrent_wall[IMGCACHE])
    wall_n = median(hits.concurrent_wall[NGINX])
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


def cold_rows(cold: ColdResults) -> list[list[str]]:
    """Table rows for the cold measurements (storm and lone MISS)."""
    reps, n, size = cold.reps, cold.clients, human_size(cold.size)
    wall = median([r.storm_wall for r in reps])
    direct_1 = median([r.direct_1 for r in reps])
    direct_n = median([r.direct_n_wall for r in reps])
    miss = median([r.miss_total for r in reps])
    ttfb_med = median([median(r.ttfbs) for r in reps])
    ttfb_max = median([max(r.ttfbs) for r in reps])
    lag = median([r.commit_lag for r in reps])
    mb = cold.size / 1e6
    return [
        [f"Cold storm, {n} clients, {size}: wall s until all finish",
         f"{wall:.2f}", f"1 direct download from nginx {direct_1:.2f}",
         f"**{wall / direct_1:.2f}**", "lower"],
        [f"Cold storm, {n} clients: wall s (vs {n} direct downloads at once)",
         f"{wall:.2f}", f"{n} at once from nginx {direct_n:.2f}",
         f"**{wall / direct_n:.2f}**", "lower"],
        ["Cold storm: client time to first byte, median / max s",
         f"{ttfb_med:.3f} / {ttfb_max:.3f}", "", "", "lower"],
        [f"Cold storm: upstream data GETs per storm (must be 1; {len(reps)} storms)",
         ", ".join(str(r.upstream_gets) for r in reps), "", "", ""],
        ["Cold storm: fill committed (fdatasync, rename) s after the last client finished",
         f"{lag:.2f}", "", "", ""],
        [f"Cold, 1 client (MISS), {size}: MB/s", f"{mb / miss:.0f}",
         f"1 direct download from nginx {mb / direct_1:.0f}",
         f"**{direct_1 / miss:.2f}**", "higher"],
    ]


def _samples_section(hits: HitResults | None, cold: ColdResults | None) -> str:
    lines = []
    if hits:
        for name in (IMGCACHE, NGINX):
            lines.append(f"- hit 1 client, {name}, MB/s: "
                         f"{_spread(hits.single_mbps[name], '.0f')}")
        for name in (IMGCACHE, NGINX):
            lines.append(f"- hit {hits.clients} clients, {name}, wall s: "
                         f"{_spread(hits.concurrent_wall[name], '.2f')}")
    if cold:
        reps, n = cold.reps, cold.clients
        lines += [
            f"- cold storm of {n}, wall s: {_spread([r.storm_wall for r in reps], '.2f')}",
            f"- direct 1 client, s: {_spread([r.direct_1 for r in reps], '.2f')}",
            f"- direct {n} at once, wall s: {_spread([r.direct_n_wall for r in reps], '.2f')}",
            f"- cold lone MISS, s: {_spread([r.miss_total for r in reps], '.2f')}",
            f"- storm TTFB max s: {_spread([max(r.ttfbs) for r in reps], '.3f')}",
            f"- storm commit lag s: {_spread([r.commit_lag for r in reps], '.2f')}",
            "- storm X-Cache-Status: " + "; ".join(
                ", ".join(f"{k} {v}" for k, v in sorted(r.cache_statuses.items()))
                for r in reps),
        ]
    return "\n".join(lines)


def render(hits: HitResults | None, cold: ColdResults | None, checks: Checks,
           machine: list[tuple[str, str]], reps: int, command: str) -> str:
    """The whole markdown report."""
    rows = (hit_rows(hits) if hits else []) + (cold_rows(cold) if cold else [])
    parts = [
        "# imgcache benchmark",
        "",
        f"`{command}`: {'medians of ' if reps > 1 else ''}{reps} repetition"
        f"{'s' if reps > 1 else ''}; every baseline was measured in the "
        f"same run, alternating with imgcache. MB = 10^6 bytes. Ratio = imgcache / baseline "
        f"(the last column says which way is better). {verdict(checks)}.",
        "",
        markdown_table(["measurement", "imgcache", "baseline (same run)", "ratio", "better"],
                       rows),
        "",
        *closing_sections(checks, _samples_section(hits, cold), machine),
    ]
    return "\n".join(parts)
