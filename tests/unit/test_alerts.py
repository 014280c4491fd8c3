"""The alert rules an operator loads (deploy/prometheus/alerts.yml): valid, each firing on the series
that mean trouble and silent on those that do not (promtool's own rule tests), and naming only metrics
the service exports."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from gnosis_ocr.metrics import COUNTERS, HISTOGRAMS
from harness.stack import ROOT

RULES = ROOT / "deploy" / "prometheus"
GAUGES = {"gnosis_queue_depth", "gnosis_pages_in_flight", "gnosis_key_pages_pending"}
"""Gauges the API computes at scrape time (api/ops.py), beside the recorded counters and histograms."""

promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                              reason="promtool (Debian's prometheus) is not installed")


@promtool
def test_the_alert_rules_are_valid_and_fire_on_what_their_tests_say():
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_names_only_metrics_the_service_exports():
    rules = [rule for group in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
    exported = set(COUNTERS) | set(HISTOGRAMS) | GAUGES
    for rule in rules:
        named = set(re.findall(r"\bgnosis_\w+", rule["expr"]))
        assert named and named <= exported, (rule["alert"], named - exported)
    tested = set(re.findall(r"alertname: (\w+)", (RULES / "alerts_test.yml").read_text()))
    assert tested == {rule["alert"] for rule in rules}, "every alert has a promtool test"
