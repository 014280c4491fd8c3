"""The Grafana dashboard against a real Prometheus scraping a real service: the API's cluster-wide /metrics and a
batched worker's own port, after pages of several jobs were recognised. The panels an operator looks at first
show data, and no query errs."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import requests

from harness.stack import free_port, poll_job, wait_until
from tests.integration.test_batched_worker import batched, submit
from tests.unit.test_dashboard import panels

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus (Debian's package) is not installed")

MUST_SHOW = {
    "Pages recognised per second", "Output tokens per second", "Queue depth", "Jobs submitted and finished per second",
    "Job latency, submit to final", "Page latency, render included", "Batch occupancy and pages per prefill",
    "Device time: decode steps against prefills", "Decode step and prefill time",
    "Wait for a batch slot, and for the first token (p95)", "Devices and the paths their start-up checks kept",
    "Model loads: cache hits and misses (per hour)", "Model load and lock wait (p95)",
}
"""Panels with data once pages were recognised (the others show faults: failures, outages, recoveries)."""


@pytest.fixture
def prometheus(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(targets: dict[str, str]) -> str:
        port = free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [address]}]}
                                     for job, address in targets.items()]}
        (tmp_path / "prometheus.yml").write_text(json.dumps(config))
        log = open(tmp_path / "prometheus.log", "w")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url), timeout=30, message="Prometheus to answer")
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def query(url: str, expr: str) -> list:
    # Grafana fills $__rate_interval in from the scrape interval; a minute holds every sample taken here.
    r = requests.get(f"{url}/api/v1/query", params={"query": expr.replace("$__rate_interval", "1m")}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_the_dashboards_panels_show_a_running_service(stack, hub, prometheus):
    batched(stack, hub, tokens=8)
    api = stack.api()
    worker_port = free_port()
    stack.worker(GNOSIS_WORKER_PORT=str(worker_port))
    jobs = [submit(api, n) for n in range(4)]
    assert [poll_job(api, job["id"], timeout=120)["status"] for job in jobs] == ["succeeded"] * 4
    url = prometheus({"api": api.removeprefix("http://"), "worker": f"127.0.0.1:{worker_port}"})
    shown = {p["title"]: p for p in panels()}
    assert MUST_SHOW <= set(shown), MUST_SHOW - set(shown)

    def with_data() -> set[str]:
        # Every query runs (none may err); a panel shows data when any of its queries has a series.
        return {title for title, panel in shown.items() if any(query(url, t["expr"]) for t in panel["targets"])}
    # rate() needs two samples of a counter in its window: a few scrapes after the pages were recorded.
    try:
        showing = wait_until(lambda: (s := with_data()) >= MUST_SHOW and s, timeout=60,
                             message="the dashboard's first panels to show data")
    except AssertionError:
        pytest.fail(f"no data in {sorted(MUST_SHOW - with_data())}")
    occupancy = query(url, shown["Batch occupancy and pages per prefill"]["targets"][1]["expr"])
    assert [float(s["value"][1]) for s in occupancy] == [4.0]  # the worker's slots, from its own port
    devices = query(url, shown["Devices and the paths their start-up checks kept"]["targets"][0]["expr"])
    assert [(s["metric"]["device"], s["metric"]["decode_attention"]) for s in devices] == [("cpu", "sdpa")]
    assert "Failed jobs by error code (last hour)" not in showing  # nothing failed
