"""``imgcache sizing``: what hit ratio each cache size would have had over this node's own
requests, from a running server (over its management socket) or from a stopped one's
cache directory; a table, bars in the terminal, ``--png`` a plot, ``--json`` for scripts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from imgcache.config import format_size, load_settings, parse_duration, parse_size
from imgcache.ctl import AdminClient, NotRunning
from imgcache.errors import ConfigError, SizingUnavailable
from imgcache.history_files import read_state
from imgcache.sizing import MISSING_EXTRA_MESSAGE, compute

_BAR = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizing command's own options (the management ones are added by ctl)."""
    parser.add_argument("--caps", help="caps to predict, e.g. 50G,100G,200G (default: 1/4x "
                        "to 8x the current cap)")
    parser.add_argument("--since", help="only requests of the last DURATION, e.g. 7d or 12h "
                        "(default: the whole history)")
    parser.add_argument("--png", type=Path, metavar="FILE", help="also plot the curve to FILE")
    parser.add_argument("--policies", action="store_true", help="also replay S3-FIFO, SIEVE "
                        "and GDSF with libCacheSim (imgcache[policies]), as a what-if")
    parser.add_argument("--cache-dir", type=Path, help="read a stopped server's cache "
                        "directory instead of asking the running server")


def _query(args: argparse.Namespace) -> tuple[list[int] | None, float | None]:
    caps = [parse_size(c) for c in args.caps.split(",")] if args.caps else None
    if caps is not None and not all(caps):
        raise ValueError("a cap must be more than 0 bytes")
    return caps, (parse_duration(args.since) if args.since else None)


def run(args: argparse.Namespace) -> int:
    """Run ``imgcache sizing``; return the exit status."""
    try:
        caps, since = _query(args)
    except ValueError as exc:
        print(f"imgcache sizing: --caps takes sizes such as 50G,100G and --since a duration "
              f"such as 7d: {exc}", file=sys.stderr)
        return 2
    try:
        answer = _answer(args, caps, since)
    except ConfigError as exc:
        print(f"imgcache: configuration error: {exc}", file=sys.stderr)
        return 2
    except NotRunning as exc:
        print(f"imgcache sizing: {exc}; or give --cache-dir to read a stopped server's "
              "history", file=sys.stderr)
        return 3
    except (RuntimeError, SizingUnavailable) as exc:
        print(f"imgcache sizing: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_rows(answer), indent=2))
    else:
        print(render(answer))
    if args.png:
        try:
            plot_png(answer, args.png)
        except ImportError:
            print(f"imgcache sizing: {MISSING_EXTRA_MESSAGE}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"\nplot written to {args.png}")
    return 0


def _answer(args: argparse.Namespace, caps: list[int] | None,
            since: float | None) -> dict[str, Any]:
    if args.cache_dir is not None:
        return _from_directory(args.cache_dir, caps, since, args.policies, None)
    settings = load_settings(config_file=args.config)
    path = args.socket or settings.admin_socket
    query = "&".join(part for part in (
        f"caps={','.join(map(str, caps))}" if caps else "",
        f"since={since}" if since is not None else "",
        "policies=1" if args.policies else "") if part)
    try:
        return AdminClient(path).call("GET", "/v1/sizing" + (f"?{query}" if query else ""))
    except NotRunning:
        if not (settings.cache_dir / "history").is_dir():
            raise
        print(f"imgcache is not running ({path}); reading its history in "
              f"{settings.cache_dir}", file=sys.stderr)
        return _from_directory(settings.cache_dir, caps, since, args.policies,
                               settings.max_size)


def _from_directory(cache_dir: Path, caps: list[int] | None, since: float | None,
                    policies: bool, configured_cap: int | None) -> dict[str, Any]:
    history = cache_dir / "history"
    if not history.is_dir():
        raise RuntimeError(f"{cache_dir} holds no access history ({history} is missing): "
                           "is it imgcache's cache directory, with [history] max_requests "
                           "above 0?")
    state = read_state(history)
    max_bytes = state.max_bytes if state else configured_cap
    if max_bytes is None:
        max_bytes = load_settings().max_size
    return compute({"history_dir": str(history), "caps": caps, "since": since,
                    "policies": policies, "max_bytes": max_bytes,
                    "pinned": dict(state.pinned) if state else {}})


def _rows(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The --json output: one object per cap."""
    rows = []
    for n, row in enumerate(answer["caps"]):
        row = {**row, "method": answer["method"], "sample_rate": answer["sample_rate"],
               "history_requests": answer["requests"]}
        if "policies" in answer:
            row["policies"] = {name: values[n] for name, values in answer["policies"].items()}
        rows.append(row)
    return rows


def _when(timestamp: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "-"


def _bar(ratio: float) -> str:
    filled = ratio * _BAR
    whole = int(filled)
    return ("█" * whole + ("▌" if filled - whole >= 0.5 else "")).ljust(_BAR)


def render(answer: dict[str, Any]) -> str:
    """The human-readable report: summary, table, bars, and the policies if asked."""
    method = ("exact" if answer["method"] == "exact" else
              f"SHARDS sample of {answer['sample_rate']:.1%} of the images")
    lines = [f"access history: {answer['requests']:,} requests of {answer['images']:,} "
             f"images, {_when(answer['first_request'])} to {_when(answer['last_request'])}"
             f" ({method})",
             f"current cap {format_size(answer['max_bytes'])}"
             + (f", {format_size(answer['pinned_bytes'])} pinned"
                if answer["pinned_bytes"] else "")]
    for skipped in answer["skipped_files"]:
        lines.append(f"skipped unreadable history file {skipped}")
    if not answer["requests"]:
        lines.append("no image requests recorded yet: nothing to predict from")
        return "\n".join(lines)
    header = ["CAP", "x CAP", "HIT RATIO", "BYTE HIT RATIO", "GLANCE SAVED/DAY",
              "FROM GLANCE/DAY"]
    table = [[format_size(r["cap_bytes"]), f"{r['cap_factor']:g}", f"{r['hit_ratio']:.1%}",
              f"{r['byte_hit_ratio']:.1%}", format_size(r["glance_bytes_saved_per_day"]),
              format_size(r["glance_bytes_per_day"])
              + (" (below pinned)" if r["below_pinned"] else "")] for r in answer["caps"]]
    lines += ["", *_table(table, header), "",
              f"hit ratio (█ requests, ▒ bytes) 0%{' ' * (_BAR - 6)}100%"]
    for r in answer["caps"]:
        lines.append(f"{format_size(r['cap_bytes']):>10} {_bar(r['hit_ratio'])} "
                     f"{r['hit_ratio']:6.1%}")
        lines.append(f"{'':>10} {_bar(r['byte_hit_ratio']).replace('█', '▒')} "
                     f"{r['byte_hit_ratio']:6.1%}")
    if "policies" in answer:
        lines += ["", "other policies, replayed by libCacheSim (what-if; imgcache is LRU): "
                  "hit ratio / byte hit ratio"]
        policy_rows = [[name, *(f"{v['hit_ratio']:.1%} / {v['byte_hit_ratio']:.1%}"
                                for v in values)]
                       for name, values in answer["policies"].items()]
        lines += _table(policy_rows, ["POLICY", *(format_size(r["cap_bytes"])
                                                  for r in answer["caps"])])
    return "\n".join(lines)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def plot_png(answer: dict[str, Any], path: Path,
             measured: list[tuple[int, float, float]] | None = None) -> None:
    """Plot the hit ratios per cap (and the other policies, if compared) to a PNG;
    ``measured`` adds (cap, hit ratio, byte hit ratio) points a real server measured."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    caps = [r["cap_bytes"] / (1 << 30) for r in answer["caps"]]
    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    axes.plot(caps, [r["hit_ratio"] for r in answer["caps"]], "-", label="LRU requests")
    axes.plot(caps, [r["byte_hit_ratio"] for r in answer["caps"]], "-", label="LRU bytes")
    for (name, values), style in zip(answer.get("policies", {}).items(),
                                     (":", ":", "-.", "--"), strict=False):
        if name != "LRU":
            axes.plot(caps, [v["hit_ratio"] for v in values], style,
                      label=f"{name} requests (libCacheSim)")
    for cap, hit_ratio, byte_hit_ratio in measured or ():
        axes.plot([cap / (1 << 30)] * 2, [hit_ratio, byte_hit_ratio], "ko", markersize=5)
    if measured:
        axes.plot([], [], "ko", markersize=5, label="measured by imgcache")
    if answer.get("max_bytes"):
        axes.axvline(answer["max_bytes"] / (1 << 30), color="grey", linestyle=":",
                     label="current cap")
    axes.set_xscale("log")
    axes.set_xlabel("cache cap (GiB)")
    axes.set_ylabel("hit ratio")
    axes.set_ylim(0, 1)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")
    axes.set_title(f"imgcache sizing: {answer['requests']:,} requests, "
                   f"{answer['images']:,} images ({answer['method']})")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
