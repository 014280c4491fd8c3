"""The Grafana dashboard an operator imports (deploy/grafana/gnosis-ocr.json): every query parses, names only
series the service exports, and every cluster-wide series the API exports has a panel."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from gnosis_ocr.metrics import COUNTERS, HISTOGRAMS
from harness.stack import ROOT
from tests.unit.test_alerts import GAUGES, promtool

DASHBOARD = ROOT / "deploy" / "grafana" / "gnosis-ocr.json"
WORKER = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(gnosis_worker_\w+)"',
                        (ROOT / "gnosis_ocr" / "worker" / "telemetry.py").read_text()))
"""Each worker's own series (its GNOSIS_WORKER_PORT), beside the API's cluster-wide ones."""


def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def named(expr: str) -> set[str]:
    """The series an expression reads, a histogram's `_bucket`, `_sum` and `_count` by the histogram's name."""
    found = set()
    for name in re.findall(r"\bgnosis_\w+", expr):
        histogram = re.sub(r"_(bucket|sum|count)$", "", name)
        found.add(histogram if histogram in HISTOGRAMS else name)
    return found


def test_every_panel_names_only_series_the_service_exports_and_every_cluster_series_has_one():
    exported = set(COUNTERS) | set(HISTOGRAMS) | GAUGES
    shown = set().union(*(named(e) for e in queries()))
    assert shown <= exported | WORKER, shown - exported - WORKER
    assert exported <= shown, f"no panel shows {sorted(exported - shown)}"
    assert "gnosis_worker_device_info" in shown


def test_every_panel_reads_the_chosen_data_source_and_none_overlaps():
    taken: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


@promtool
def test_every_query_parses(tmp_path):
    # Grafana fills $__rate_interval in; promtool parses each query as a recording rule's expression.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"gnosis:dashboard:{n}", "expr": e.replace("$__rate_interval", "5m")}
        for n, e in enumerate(queries())]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run(["promtool", "check", "rules", "dashboard.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
