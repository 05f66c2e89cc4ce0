"""The peer comparison's report: a markdown table (medians, the best peer, imgcache's ratio
to it), the targets met or missed, checks, raw samples, machine details; and a PNG chart."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common.checks import Checks
from bench.common.images import human_size
from bench.common.report_parts import (
    bullets,
    closing_sections,
    markdown_table,
    median,
    table_head,
    verdict,
)
from bench.peers.measure import (
    BOUND,
    DIRECT,
    IMGCACHE,
    NGINX,
    NGINX_1H,
    THREAD_ROLES,
    VARNISH,
    Results,
)
from bench.peers.shaping import UNSHAPED

COLUMNS = [IMGCACHE, NGINX, NGINX_1H, VARNISH, DIRECT]
PEERS = [NGINX, NGINX_1H, VARNISH, DIRECT]
HIGHER, LOWER, INFO = "higher", "lower", ""


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric of the results."""

    label: str
    metric: str
    better: str  # HIGHER, LOWER or INFO (no best peer, no ratio)
    fmt: str = ".0f"
    bound: Callable[[Results], float] | None = None  # the bound column, if any


@dataclass
class Sizes:
    """Image sizes and client counts of the run, for labels."""

    hit: int
    storm: int
    big: int
    small: int
    real: int
    clients: int
    storm_clients: int
    small_clients: int
    small_seconds: float
    links: dict[str, str]  # link name -> label ("1 Gbit/s")


def best_peer(results: Results, metric: str, better: str) -> tuple[str, float] | None:
    """The peer with the best median of ``metric`` (None if no peer has samples)."""
    medians = [(name, results.median(metric, name)) for name in PEERS
               if results.get(metric, name)]
    if not medians or better == INFO:
        return None
    pick = max if better == HIGHER else min
    return pick(medians, key=lambda item: item[1])


def _bound(metric: str) -> Callable[[Results], float]:
    return lambda r: r.median(metric, BOUND)


def storm_bound(link: str) -> Callable[[Results], float]:
    """The bound no cache can beat on ``link``: the larger of one direct download at the
    link's speed and nginx fanning the local file out to the same clients."""
    return lambda r: max(r.median(f"storm.{link}.direct1_wall", BOUND),
                         r.median("storm.fanout.wall", BOUND))


#: imgcache's threads by role, as the report names them.
_THREADS = dict(zip(THREAD_ROLES, ("event-loop thread", "hasher thread (sha512)",
                                   "writer thread (the cache file)",
                                   "sending threads, together"), strict=True))


def _thread_rows(key: str, prefix: str = "") -> list[Row]:
    """imgcache's threads by role (the hasher is a cold miss's critical path), each on a
    CPU and runnable but waiting for one."""
    return [row for role, label in _THREADS.items() for row in (
        Row(f"{prefix}imgcache {label} on a CPU s", f"{key}.{role}_run_s", INFO, ".2f"),
        Row(f"{prefix}imgcache {label} runnable but waiting for a CPU s",
            f"{key}.{role}_wait_s", INFO, ".2f"))]


def rows(sizes: Sizes) -> list[tuple[str, list[Row]]]:
    """The table, section by section."""
    n, sn = sizes.clients, sizes.storm_clients
    hit, storm = human_size(sizes.hit), human_size(sizes.storm)
    sections: list[tuple[str, list[Row]]] = [
        ("1. Hits", [
            Row(f"cached {hit}, 1 client: MB/s", "hit1.mbps", HIGHER),
            Row(f"cached {hit}, {n} clients at once: aggregate MB/s", "hitN.mbps", HIGHER),
        ]),
    ]
    for link, label in sizes.links.items():
        key = f"storm.{link}"
        sections.append((f"2. Cold boot storm, {sn} clients, {storm}, upstream link "
                         f"{label}", [
            Row("wall s until all finish", f"{key}.wall", LOWER, ".2f", storm_bound(link)),
            Row("wall s, no cache: clients x image / link, computed (not run)",
                f"{key}.wall_computed", INFO, ".1f"),
            Row("time to first byte, first client s", f"{key}.ttfb_first", LOWER, ".3f",
                _bound("storm.fanout.ttfb_first")),
            Row("time to first byte, p50 s", f"{key}.ttfb_p50", LOWER, ".3f",
                _bound("storm.fanout.ttfb_p50")),
            Row("time to first byte, p99 s", f"{key}.ttfb_p99", LOWER, ".3f",
                _bound("storm.fanout.ttfb_p99")),
            Row("p99 minus the first client's time to first byte s", f"{key}.ttfb_spread",
                LOWER, ".3f", _bound("storm.fanout.ttfb_spread")),
            Row("time to first byte, max s", f"{key}.ttfb_max", LOWER, ".3f",
                _bound("storm.fanout.ttfb_max")),
            Row("upstream data requests", f"{key}.requests", LOWER, ".0f"),
            Row("upstream MB", f"{key}.upstream_mb", LOWER, ".0f",
                lambda r, s=sizes.storm: s / 1e6),
            Row("imgcache's metadata GETs to Glance (authorization)",
                f"{key}.metadata_gets", INFO, ".0f"),
            Row("imgcache's bytes to its readers copied from shared mappings, not sendfile %",
                f"{key}.mapped_pct", INFO, ".0f"),
            Row("cold miss, 1 client over this link (imgcache verifies sha512): MB/s",
                f"{key}.cold_mbps", HIGHER, ".0f"),
            Row("CPU s of the contender's processes during the storm", f"{key}.cpu_s",
                LOWER, ".1f"),
            Row(f"CPU s of the {sn} curl clients", f"{key}.clients_cpu_s", INFO, ".1f"),
            Row("CPU s of the upstream", f"{key}.upstream_cpu_s", INFO, ".1f"),
            Row("CPU s of everything else on the machine", f"{key}.other_cpu_s", INFO,
                ".1f"),
            Row("machine CPU busy during the storm %", f"{key}.busy_pct", INFO, ".0f"),
            *_thread_rows(key),
        ]))
    sections += [
        ("3. Cold miss, 1 client, sha512 verified (imgcache only)", [
            Row(f"{hit}: MB/s (bound: sha512 on one core, hashlib)", "cold.mbps", HIGHER,
                ".0f", _bound("cold.sha512_mbps")),
            Row("disk writes, dd bs=1M conv=fdatasync: MB/s", "cold.disk_mbps", INFO, ".0f",
                _bound("cold.disk_mbps")),
            Row("CPU s per GB of the contender's processes", "cold.cpu_s_per_gb", LOWER,
                ".2f"),
            Row(f"{hit} at the cap, right after an image left the cache: MB/s",
                "cold_at_cap.mbps", INFO, ".0f"),
            Row("at the cap: CPU s per GB of imgcache's processes",
                "cold_at_cap.cpu_s_per_gb", INFO, ".2f"),
            Row("CPU s of the curl client", "cold.clients_cpu_s", INFO, ".2f"),
            Row("CPU s of the upstream", "cold.upstream_cpu_s", INFO, ".2f"),
            Row("CPU s of everything else on the machine", "cold.other_cpu_s", INFO, ".2f"),
            Row("machine CPU busy during the download %", "cold.busy_pct", INFO, ".0f"),
            *_thread_rows("cold"),
            *_thread_rows("cold_at_cap", "at the cap: "),
        ]),
        ("4. Peak RSS of imgcache (VmHWM)", [
            *[Row(f"during the {sizes.links[link]} storm: MiB", f"storm.{link}.rss_mib", INFO,
                  ".0f") for link in sizes.links],
            Row(f"filling {hit} for 1 client: MiB", "cold.rss_mib", INFO, ".0f"),
            Row(f"filling {human_size(sizes.big)} for 1 client: MiB", "big.rss_mib", INFO,
                ".0f"),
        ]),
        ("5. Bytes written to disk per fill / image size (/proc/PID/io write_bytes)", [
            *[Row(f"{storm}, {sizes.links[link]} storm", f"storm.{link}.written_per_fill",
                  INFO, ".3f") for link in sizes.links],
            Row(f"{hit}, 1 client", "cold.written_per_fill", INFO, ".3f"),
            Row(f"{human_size(sizes.big)}, 1 client", "big.written_per_fill", INFO, ".3f"),
        ]),
        (f"6. Many small hits: {human_size(sizes.small)}, {sizes.small_clients} keep-alive "
         f"connections (wrk, {sizes.small_seconds:g} s)", [
            Row("requests/s", "small.rps", HIGHER, ".0f"),
            Row("latency p99 ms", "small.p99_ms", LOWER, ".1f"),
        ]),
        (f"Real glance-api 33: cold storm, {sn} clients, {human_size(sizes.real)}", [
            Row("wall s until all finish", "real.wall", LOWER, ".2f"),
            Row("time to first byte, first client s", "real.ttfb_first", LOWER, ".3f"),
            Row("time to first byte, p50 s", "real.ttfb_p50", LOWER, ".3f"),
            Row("time to first byte, p99 s", "real.ttfb_p99", LOWER, ".3f"),
            Row("p99 minus the first client's time to first byte s", "real.ttfb_spread",
                LOWER, ".3f"),
            Row("time to first byte, max s", "real.ttfb_max", LOWER, ".3f"),
            Row("upstream data requests", "real.requests", LOWER, ".0f"),
            Row("imgcache's metadata GETs to Glance (authorization)", "real.metadata_gets",
                INFO, ".0f"),
            Row("CPU s of the contender's processes during the storm", "real.cpu_s",
                LOWER, ".1f"),
        ]),
    ]
    return sections


def _cell(results: Results, metric: str, name: str, fmt: str) -> str:
    values = results.get(metric, name)
    if not values:
        return ""
    return format(median(values), fmt)


def table(results: Results, sizes: Sizes) -> str:
    """The markdown table of every section that has samples."""
    header = ["measurement", *COLUMNS, "bound", "best peer", "imgcache / best peer", "better"]
    lines = table_head(header)
    for title, section in rows(sizes):
        present = [row for row in section if results.series.get(row.metric)]
        if not present:
            continue
        lines.append(f"| **{title}** |" + " |" * (len(header) - 1))
        for row in present:
            cells = [_cell(results, row.metric, name, row.fmt) for name in COLUMNS]
            bound = ""
            if row.bound is not None:
                value = row.bound(results)
                if not math.isnan(value):
                    bound = f"{value:{row.fmt}}"
            best = best_peer(results, row.metric, row.better)
            best_text = ratio = ""
            if best is not None:
                best_text = f"{best[0]} {best[1]:{row.fmt}}"
                mine = results.median(row.metric, IMGCACHE)
                if best[1] and not math.isnan(mine):
                    ratio = f"**{mine / best[1]:.2f}**"
            lines.append("| " + " | ".join([row.label, *cells, bound, best_text, ratio,
                                             row.better]) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One target of the issue and how the run fared."""

    scenario: str
    text: str
    figure: str
    met: bool | None  # None: not measured


def _fmt(value: float, fmt: str = ".2f") -> str:
    return "n/a" if math.isnan(value) else format(value, fmt)


def _ratio(mine: float, theirs: float) -> float:
    """``mine / theirs``; NaN when either is missing or ``theirs`` is 0."""
    return mine / theirs if theirs and not math.isnan(theirs) else math.nan


def _met(ratio: float, ok: Callable[[float], bool]) -> bool | None:
    return None if math.isnan(ratio) else ok(ratio)


#: The two nginx figures imgcache's hits are held to, by contender.
_NGINXES = {NGINX: "nginx proxy_cache", DIRECT: "nginx serving the file itself"}


def _against_nginxes(r: Results, metric: str, fmt: str) -> tuple[dict[str, float], str]:
    """imgcache's median of ``metric`` over nginx proxy_cache's and over nginx serving the
    file itself ({contender: ratio}), and the text of both (their medians in ``fmt``)."""
    mine = r.median(metric, IMGCACHE)
    theirs = {name: r.median(metric, name) for name in _NGINXES}
    ratios = {name: _ratio(mine, value) for name, value in theirs.items()}
    return ratios, ", ".join(f"{_fmt(ratios[name])}x {label} ({_fmt(theirs[name], fmt)})"
                             for name, label in _NGINXES.items())


def targets(results: Results, sizes: Sizes) -> list[Target]:
    """Every target of the issue with the run's figure, by scenario."""
    r = results
    found: list[Target] = []
    for metric, what in (("hit1.mbps", "1 client"), ("hitN.mbps", f"{sizes.clients} clients")):
        ratios, text = _against_nginxes(r, metric, ".0f")
        found.append(Target("1", f"hit throughput, {what}: >= 1.0x nginx proxy_cache's "
                            "(uvloop on)", f"{_fmt(r.median(metric, IMGCACHE), '.0f')} MB/s: "
                            f"{text}", _met(ratios[NGINX], lambda x: x >= 1.0)))
    for link, label in sizes.links.items():
        key = f"storm.{link}"
        requests = r.get(f"{key}.requests", IMGCACHE)
        if not requests:
            continue
        found.append(Target("2", f"{label}: exactly 1 upstream data request per storm",
                            ", ".join(f"{v:.0f}" for v in requests),
                            all(v == 1 for v in requests)))
        spread = r.get(f"{key}.ttfb_spread", IMGCACHE)
        floor = r.median("storm.fanout.ttfb_spread", BOUND)
        found.append(Target("2", f"{label}: p99 time to first byte within 0.1 s of the "
                            "first client's", f"p99 - first = {_fmt(median(spread), '.3f')} s "
                            f"(median; max {_fmt(max(spread), '.3f')}); nginx serving the "
                            f"local file to as many clients: {_fmt(floor, '.3f')} s",
                            median(spread) <= 0.1))
        wall = r.median(f"{key}.wall", IMGCACHE)
        bound = storm_bound(link)(r)
        found.append(Target("2", f"{label}: wall time <= 1.25x the bound",
                            f"{_fmt(wall)} s = {_fmt(wall / bound)}x the bound "
                            f"{_fmt(bound)} s", wall <= 1.25 * bound))
        peers = {name: r.median(f"{key}.wall", name) for name in PEERS
                 if r.get(f"{key}.wall", name)}
        found.append(Target("2", f"{label}: wall time <= every peer's",
                            ", ".join(f"{name} {_fmt(v)} s" for name, v in peers.items()),
                            all(wall <= v for v in peers.values())))
    for link, label in sizes.links.items():
        mine, direct = (r.median(f"storm.{link}.cold_mbps", name) for name in (IMGCACHE, DIRECT))
        if not math.isnan(mine):
            found.append(Target("3", f"cold miss, 1 client, {label} link: >= 0.9x a direct "
                                "download", f"{_fmt(mine / direct)}x direct ({mine:.0f} vs "
                                f"{direct:.0f} MB/s)", mine >= 0.9 * direct))
    mine, direct = r.median("cold.mbps", IMGCACHE), r.median("cold.mbps", DIRECT)
    if not math.isnan(mine):
        sha = r.median("cold.sha512_mbps", BOUND)
        found.append(Target("3", "cold miss, 1 client, loopback (no link): >= 0.9x a direct "
                            "download",
                            f"{_fmt(mine / direct)}x direct ({mine:.0f} vs {direct:.0f} MB/s);"
                            f" {_fmt(mine / sha)}x the sha512 bound ({sha:.0f} MB/s)",
                            mine >= 0.9 * direct))
    rss = [v for link in sizes.links for v in r.get(f"storm.{link}.rss_mib", IMGCACHE)]
    rss += r.get("cold.rss_mib", IMGCACHE) + r.get("big.rss_mib", IMGCACHE)
    if rss:
        found.append(Target("4", "peak RSS <= 100 MiB", f"max {max(rss):.0f} MiB over "
                            f"{len(rss)} measurements", max(rss) <= 100))
    small, big = r.median("cold.rss_mib", IMGCACHE), r.median("big.rss_mib", IMGCACHE)
    if not math.isnan(small) and not math.isnan(big):
        found.append(Target("4", f"the same peak RSS for {human_size(sizes.big)} as for "
                            f"{human_size(sizes.hit)} (within 10%)",
                            f"{big:.0f} vs {small:.0f} MiB (medians)",
                            big <= small * 1.1))
    written = [v for link in sizes.links for v in r.get(f"storm.{link}.written_per_fill",
                                                         IMGCACHE)]
    written += r.get("cold.written_per_fill", IMGCACHE) + r.get("big.written_per_fill",
                                                                IMGCACHE)
    if written:
        found.append(Target("5", "bytes written per fill <= 1.02x the image",
                            f"max {max(written):.3f} over {len(written)} fills",
                            max(written) <= 1.02))
    found += [*_cold_cost_targets(r), *_storm_race_targets(r, sizes), *_small_targets(r)]
    return sorted(found, key=lambda t: t.scenario)


def _cold_cost_targets(r: Results) -> list[Target]:
    """Scenario 3's targets against the sha512 bound measured in the same repetitions:
    imgcache's CPU per cold GB, and its cold miss rate; each for the fills alternating
    with the peers and for the fills at the cap (``measure.imgcache_cold_at_cap``), with
    Varnish's CPU per GB (its alternating cold misses) beside them."""
    sha = r.median("cold.sha512_mbps", BOUND)
    if math.isnan(sha) or math.isnan(r.median("cold.cpu_s_per_gb", IMGCACHE)):
        return []
    limit = 1000 / sha + 0.8
    found = []
    for key, when in (("cold", "alternating with the peers"),
                      ("cold_at_cap", "at the cap, right after an image left the cache")):
        cpu, mine = r.median(f"{key}.cpu_s_per_gb", IMGCACHE), r.median(f"{key}.mbps", IMGCACHE)
        if math.isnan(cpu):
            continue
        ratio = _ratio(mine, sha)
        found += [
            Target("3", f"CPU s per cold GB (imgcache's processes) <= the sha512 cost per GB "
                   f"measured in this run + 0.8 s; {when}",
                   f"{cpu:.2f} s/GB; sha512 {1000 / sha:.2f} s/GB (at {sha:.0f} MB/s) + 0.8 = "
                   f"{limit:.2f}; varnish (alternating) "
                   f"{_fmt(r.median('cold.cpu_s_per_gb', VARNISH))} s/GB", cpu <= limit),
            Target("3", f"cold miss, 1 client, loopback (no link): >= 0.9x the sha512 bound "
                   f"(one core); {when}", f"{_fmt(mine, '.0f')} MB/s = {_fmt(ratio)}x the "
                   f"bound {sha:.0f} MB/s", _met(ratio, lambda x: x >= 0.9)),
        ]
    return found


def _storm_race_targets(r: Results, sizes: Sizes) -> list[Target]:
    """Scenario 2's targets against Varnish: imgcache's storm wall time <= Varnish's on
    every link (the unshaped loopback one included), and the largest time to first byte
    of any imgcache storm client over the links <= 0.2 s."""
    found: list[Target] = []
    worst: list[tuple[float, str]] = []
    for link, label in sizes.links.items():
        key = f"storm.{link}"
        wall, varnish = r.median(f"{key}.wall", IMGCACHE), r.median(f"{key}.wall", VARNISH)
        if math.isnan(wall):
            continue
        ratio, bound = _ratio(wall, varnish), storm_bound(link)(r)
        found.append(Target("2", f"{label}: storm wall time <= 1.0x Varnish's",
                            f"{wall:.2f} vs {_fmt(varnish)} s = {_fmt(ratio)}x; the bound "
                            f"{_fmt(bound)} s (Varnish / bound {_fmt(_ratio(varnish, bound))}x)",
                            _met(ratio, lambda x: x <= 1.0)))
        worst += [(v, label) for v in r.get(f"{key}.ttfb_max", IMGCACHE)]
    if not found:
        return []
    if UNSHAPED not in sizes.links:
        found.append(Target("2", "unshaped loopback: storm wall time <= 1.0x Varnish's",
                            f"not run (--links without {UNSHAPED})", None))
    if worst:
        top, where = max(worst)
        found.append(Target("2", "max time to first byte <= 0.2 s, over every imgcache "
                            "client of every storm over a link",
                            f"{top:.3f} s ({where}, of {len(worst)} storms); nginx's "
                            "local file to as many clients: max "
                            f"{_fmt(r.median('storm.fanout.ttfb_max', BOUND), '.3f')} s "
                            "(median)", top <= 0.2))
    return found


def _small_targets(r: Results) -> list[Target]:
    """Scenario 6's targets, each judged twice: against nginx proxy_cache (the nginx of
    the issue's figures, 2,577 requests/s and a 37 ms p99), and against nginx serving the
    file itself."""
    if not r.get("small.rps", IMGCACHE):
        return []
    found = []
    for name, label in _NGINXES.items():
        for metric, unit, fmt, what, ok in (
                ("small.rps", "req/s", ".0f", "requests/s >= 0.8x", lambda x: x >= 0.8),
                ("small.p99_ms", "ms", ".1f", "latency p99 <= 1.5x", lambda x: x <= 1.5)):
            mine, theirs = r.median(metric, IMGCACHE), r.median(metric, name)
            ratio = _ratio(mine, theirs)
            found.append(Target("6", f"small hits: {what} nginx's; judged against {label}",
                                f"{_fmt(mine, fmt)} against {_fmt(theirs, fmt)} {unit} = "
                                f"{_fmt(ratio)}x", _met(ratio, ok)))
    return found


def _targets_table(found: list[Target]) -> str:
    rows = []
    for t in found:
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        rows.append([t.scenario, t.text, t.figure, met])
    return markdown_table(["scenario", "target", "this run", "met"], rows)


def _samples(results: Results) -> str:
    lines = []
    for metric in sorted(results.series):
        per = results.series[metric]
        text = "; ".join(f"{name} " + ", ".join(f"{v:.3g}" for v in values)
                         for name, values in per.items())
        lines.append(f"- {metric}: {text}")
    return "\n".join(lines)


def render(results: Results, checks: Checks, sizes: Sizes, machine: list[tuple[str, str]],
           setup: list[str], command: str, reps: int, chart: str | None) -> str:
    """The whole markdown report."""
    parts = [
        "# imgcache against the caches an operator would pick instead",
        "",
        f"`{command}`: medians of {reps} repetitions; all contenders measured in the same run, "
        f"alternating; clients are curl processes (wrk for scenario 6) for everyone. "
        f"MB = 10^6 bytes. *imgcache / best peer* compares imgcache's median with the "
        f"best median of nginx, nginx-1h, Varnish and the direct download; *better* says "
        f"which way is good. *bound*, measured in the same repetitions: for a storm's wall "
        f"time the larger of one direct download over the link and nginx serving the "
        f"already-local file to as many clients (this machine's fan-out limit); for its "
        f"times to first byte, what those clients of nginx's local file saw (the floor "
        f"with this many curl processes on this machine); for the cold miss, sha512 on one "
        f"core. {verdict(checks)}.",
        "",
        "**The peers do no authorization at all**: they serve whatever they cached to "
        "anyone, while imgcache asks Glance whether each caller may read the image "
        "(a metadata GET per token and image, the answer reused for 30 s). That asymmetry "
        "favours the peers, and none of them checks the image's hash.",
        "",
        table(results, sizes),
        "",
        *([f"![chart]({chart})", ""] if chart else []),
        "## Targets",
        "",
        _targets_table(targets(results, sizes)),
        "",
        "## Setup",
        "",
        bullets(setup),
        "",
        *(["## Notes", "", bullets(results.notes), ""] if results.notes else []),
        *closing_sections(checks, _samples(results), machine),
    ]
    return "\n".join(parts)


_COLORS = {IMGCACHE: "#1f77b4", NGINX: "#ff7f0e", NGINX_1H: "#d62728", VARNISH: "#2ca02c",
           DIRECT: "#7f7f7f"}


def chart(results: Results, sizes: Sizes, path: Path) -> bool:
    """Bar charts of the main figures (medians, whiskers min..max) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, str]], str, Callable[[Results], float] | None]]
    panels = [("1. Hit MB/s (higher is better)",
               [("1 client", "hit1.mbps"), (f"{sizes.clients} clients", "hitN.mbps")],
               "MB/s", None)]
    for link, label in sizes.links.items():
        panels.append((f"2. Storm {label}: seconds (lower is better)",
                       [("wall", f"storm.{link}.wall"), ("TTFB p99", f"storm.{link}.ttfb_p99")],
                       "s", storm_bound(link)))
    panels += [
        ("3. Cold miss, 1 client, MB/s",
         [("alternating", "cold.mbps"), ("imgcache at the cap", "cold_at_cap.mbps")], "MB/s",
         lambda r: r.median("cold.sha512_mbps", BOUND)),
        (f"6. Small hits, {sizes.small_clients} conns: req/s", [("req/s", "small.rps")],
         "requests/s", None),
        ("Real glance-api: seconds (lower is better)",
         [("wall", "real.wall"), ("TTFB p99", "real.ttfb_p99")], "s", None),
    ]
    panels = [p for p in panels if any(results.series.get(m) for _, m in p[1])]
    if not panels:
        return False
    cols = 3
    rows_ = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, 4.2 * rows_), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, groups, unit, bound) in zip(axes.flat, panels, strict=False):
        present = [name for name in COLUMNS
                   if any(results.get(metric, name) for _, metric in groups)]
        width = 0.8 / max(1, len(present))
        for i, name in enumerate(present):
            xs, heights, lows, highs = [], [], [], []
            for g, (_, metric) in enumerate(groups):
                values = results.get(metric, name)
                if values:
                    med = median(values)
                    xs.append(g + (i - (len(present) - 1) / 2) * width)
                    heights.append(med)
                    lows.append(med - min(values))
                    highs.append(max(values) - med)
            if xs:
                ax.bar(xs, heights, width, label=name, color=_COLORS[name],
                       yerr=[lows, highs], capsize=2)
        if bound is not None:
            value = bound(results)
            if not math.isnan(value):
                ax.axhline(value, color="black", linestyle="--", linewidth=1,
                           label="bound" if unit == "s" else "sha512 bound")
        ax.set_xticks(range(len(groups)), [g for g, _ in groups])
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
