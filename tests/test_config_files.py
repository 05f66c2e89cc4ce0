"""config/grafana-dashboard.json and config/prometheus-rules.yml: valid, naming only metrics
that imgcache exports and the README documents, and (with promtool) alerts that fire when
they should and only then."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from imgcache.metrics import Metrics

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
RULES = ROOT / "config" / "prometheus-rules.yml"
RULES_SCENARIOS = Path(__file__).parent / "promtool" / "rules-test.yml"
#: Where `make promtool` puts promtool when it is not on PATH.
CACHED_PROMTOOL = Path.home() / ".cache" / "imgcache" / "promtool" / "promtool"

#: What Grafana puts in place of its variables, for promtool's parser.
GRAFANA_VALUES = {"__rate_interval": "5m", "__range": "1h", "__interval": "1m",
                  "instance": ".*"}

_TOKEN = re.compile(r"""
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<braces>\{[^}]*\})
    | (?P<brackets>\[[^\]]*\])
    | (?P<variable>\$\{?\w+\}?)
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[smhdwy]?)
    | (?P<name>[A-Za-z_:][\w:]*)
    | (?P<other>\S)
""", re.VERBOSE)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "and", "or", "unless", "atan2", "inf", "nan"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names in by(...)/on(...) lists, strings, matchers, ranges or numbers."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    names: set[str] = set()
    in_label_list = False
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if in_label_list:
            in_label_list = text != ")"
        elif kind == "name" and text in _LABEL_LISTS and following == "(":
            in_label_list = True
            continue
        elif kind == "name" and text not in _KEYWORDS and following not in (
                "(", "by", "without"):  # a call, or an aggregation: sum by (x) (...)
            names.add(text)
    return names


def documented_metrics() -> set[str]:
    """Metric names in the README's metrics table."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(imgcache_\w+)` \|", table, re.MULTILINE))


def exported_metrics() -> set[str]:
    """Sample names a fresh imgcache.metrics.Metrics() exposes at /metrics, with one tier
    node configured (the per-node series exist only then)."""
    metrics = Metrics()
    metrics.add_tier_node("http://tier-1.example:3128")
    text = generate_latest(metrics.registry).decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0]
            for line in text.splitlines() if line and not line.startswith("#")}


def dashboard() -> dict[str, Any]:
    """The dashboard, parsed."""
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel that is not a row (rows' collapsed children included)."""
    found = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    exprs = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def rules() -> list[dict[str, Any]]:
    """Every rule of the rules file."""
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (result) (rate(imgcache_requests_total{result=~"hit|miss"}[5m]))',
     {"imgcache_requests_total"}),
    ("a / on(instance, job) group_left(kind) b offset 5m", {"a", "b"}),
    ('max without (le) (x{l="by (y)"}) > 1e3 and z', {"x", "z"}),
    ("increase(c[$__rate_interval]) * 60 - d{instance=~\"$instance\"}", {"c", "d"}),
    ("label_values(up, instance)", {"up", "instance"}),
])
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_readme_documents_what_metrics_exports() -> None:
    assert documented_metrics()  # the table was found
    assert documented_metrics() == exported_metrics()


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    for expr in dashboard_exprs():
        used = set(re.findall(r"\$\{?(\w+)", expr)) - {"__rate_interval", "__range",
                                                          "__interval"}
        assert used <= variables, expr


def test_the_dashboard_names_only_exported_and_documented_metrics() -> None:
    exported, documented = exported_metrics(), documented_metrics()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r}: not exported: {names - exported}"
        assert names <= documented, f"{expr!r}: not in README's table: {names - documented}"


def test_the_dashboard_shows_every_documented_metric() -> None:
    shown = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    assert documented_metrics() - shown == set()


def test_the_rules_file_is_well_formed() -> None:
    found = rules()
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names))
    assert {"ImgcacheHitRatioLow", "ImgcacheChecksumFailures", "ImgcacheUpstreamErrors",
            "ImgcachePinnedCacheFull", "ImgcacheFillsStuck"} <= set(names)
    exported, documented = exported_metrics(), documented_metrics()
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert len(rule["annotations"]["summary"]) > 20, rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, rule["alert"]
        names = metric_names(rule["expr"])
        assert names and names <= exported & documented, (rule["alert"], names)
    pinned = next(r for r in found if r["alert"] == "ImgcachePinnedCacheFull")
    assert {"imgcache_cache_pinned_bytes", "imgcache_cache_bytes"} <= metric_names(
        pinned["expr"])
    stuck = next(r for r in found if r["alert"] == "ImgcacheFillsStuck")
    assert metric_names(stuck["expr"]) == {"imgcache_fills_in_progress",
                                           "imgcache_upstream_bytes_total"}
    assert "[10m]" in stuck["expr"]


def promtool() -> str:
    """promtool from PATH or where `make promtool` puts it; skips the test without it."""
    found = shutil.which("promtool") or (str(CACHED_PROMTOOL)
                                         if CACHED_PROMTOOL.exists() else None)
    if found is None:
        pytest.skip("promtool not installed: `make promtool` fetches it")
    return found


def run_promtool(*args: str) -> str:
    """Run promtool; fail the test with its output unless it succeeds."""
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules() -> None:
    assert "SUCCESS: 11 rules found" in run_promtool("check", "rules", str(RULES))


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    """Each dashboard expression, its Grafana variables filled in, as a recording rule."""
    def fill(expr: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VALUES[m.group(1)], expr)

    records = [{"record": f"dashboard:expr{i}", "expr": fill(expr)}
               for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    assert f"SUCCESS: {len(records)} rules found" in run_promtool("check", "rules", str(path))


def test_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    """tests/promtool/rules-test.yml against the rules, annotations left out (their text
    and templates are what `promtool check rules` checks)."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "prometheus-rules.yml").write_text(yaml.safe_dump(document))
    shutil.copy(RULES_SCENARIOS, tmp_path / "rules-test.yml")
    assert "SUCCESS" in run_promtool("test", "rules", str(tmp_path / "rules-test.yml"))
