"""Markdown pieces both reports (``report.py``, ``peer_report.py``) are made of: tables,
the checks and their verdict, the closing samples and machine sections; and the median
their figures are."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from measure import Checks


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
