"""Markdown pieces the reports are made of: tables, the checks and their verdict, the closing
samples and machine sections (``machine_details``); and the median their figures are."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from bench.common.checks import Checks
from bench.common.images import human_size
from bench.common.procs import run_text


def median(values: list[float]) -> float:
    """The median of ``values``; NaN when there are none."""
    return statistics.median(values) if values else math.nan


def table_head(header: list[str]) -> list[str]:
    """The first two lines of a markdown table: the header and the separator."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A markdown table."""
    return "\n".join([*table_head(header), *("| " + " | ".join(row) + " |" for row in rows)])


def bullets(lines: Iterable[str]) -> str:
    """A markdown list, one item per line."""
    return "\n".join(f"- {line}" for line in lines)


def verdict(checks: Checks) -> str:
    """Whether every check passed, as the report's first paragraph says it."""
    return "all checks passed" if not checks.failed else "**SOME CHECKS FAILED**"


def checks_table(checks: Checks) -> str:
    """Every check: how often it ran, and ok or how often (and first how) it failed."""
    rows = []
    for name in checks.names():
        failed = checks.failed[name]
        result = "ok" if not failed else f"**FAILED {failed}x**: {checks.first_failure[name]}"
        rows.append([name, str(checks.passed[name] + failed), result])
    return markdown_table(["check", "count", "result"], rows)


def closing_sections(checks: Checks, samples: str,
                     machine: list[tuple[str, str]]) -> list[str]:
    """The report's last sections, a line each: checks, raw samples (in run order), the
    machine's details."""
    return [
        "## Checks",
        "",
        checks_table(checks),
        "",
        "## Samples (in run order)",
        "",
        samples,
        "",
        "## Machine",
        "",
        bullets(f"{name}: {value}" for name, value in machine),
        "",
    ]


def machine_details(nginx_binary: str, repo: Path) -> list[tuple[str, str]]:
    """(name, value) pairs describing where the run happened."""
    return [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("cpus (nproc)", str(len(os.sched_getaffinity(0)))),
        ("cpu model", _cpu_model()),
        ("memory", _memory()),
        ("kernel", platform.release()),
        ("free page reporting", _page_reporting()),
        ("python", sys.version.split()[0]),
        ("nginx", run_text([nginx_binary, "-v"]).removeprefix("nginx version: ")),
        ("curl", (run_text(["curl", "--version"]) or "?").splitlines()[0]),
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


#: Feature bit of a virtio-balloon device that reports the guest's free pages to the host.
_VIRTIO_BALLOON_F_REPORTING = 5


def _page_reporting() -> str:
    """Whether the kernel hands the memory its guest frees back to the host (a virtio-balloon
    device with free page reporting), which makes the next write into that memory cost the
    guest far more CPU."""
    devices = Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features")
    try:
        reporting = any(len(bits := path.read_text().strip()) > _VIRTIO_BALLOON_F_REPORTING
                        and bits[_VIRTIO_BALLOON_F_REPORTING] == "1" for path in devices)
    except OSError:
        return "unknown (the virtio-balloon features cannot be read)"
    if not reporting:
        return "off (no virtio-balloon device reports free pages)"
    try:
        order = int(Path("/sys/module/page_reporting/parameters/page_reporting_order")
                    .read_text())
    except (OSError, ValueError):
        return "on (virtio-balloon free page reporting)"
    if not 0 <= order <= 20:
        return f"on (virtio-balloon free page reporting, page_reporting_order {order})"
    block = human_size(os.sysconf("SC_PAGE_SIZE") << order)
    return (f"on: free blocks of {block} and more go back to the host (virtio-balloon, "
            f"page_reporting_order {order})")
