"""Operators' view: readiness of API and workers, Prometheus metrics, the OpenAPI description."""

from __future__ import annotations

import requests

from harness.docs import text_image
from harness.stack import free_port, poll_job, wait_until


def test_worker_probe_reports_readiness_and_its_own_metrics(stack):
    url = stack.api()
    port = free_port()
    stack.worker(GNOSIS_WORKER_PORT=str(port), concurrency=2)
    probe = f"http://127.0.0.1:{port}"
    assert requests.get(probe + "/healthz").status_code == 200
    ready = wait_until(lambda: (r := requests.get(probe + "/readyz")).status_code == 200 and r.json(), timeout=30,
                       message="the worker probe to say ready")
    assert ready["engines_loaded"] == 2 and ready["concurrency"] == 2

    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["metrics page"]))}).json()
    assert poll_job(url, job["id"])["status"] == "succeeded"
    # Counted as the page's task returns, a moment after its record ended the job (a loaded CI once read the
    # probe in between).
    text = wait_until(lambda: (t := requests.get(probe + "/metrics").text)
                      and "gnosis_worker_page_seconds_count 1.0" in t and t, timeout=10,
                      message="the page to be counted in the worker's metrics")
    assert 'gnosis_worker_pages_total{outcome="done"} 1.0' in text  # counted before its duration


def test_api_metrics_count_jobs_by_outcome_and_queue_depth(stack):
    url = stack.api()
    ok = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["fine page"]))}).json()
    # Metrics are written in the background, up to a second later.
    metrics = wait_until(lambda: (t := requests.get(f"{url}/metrics").text) and "gnosis_jobs_submitted_total 1.0" in t
                         and t, timeout=10, message="the submit to be counted")
    assert 'gnosis_queue_depth{queue="ocr"} 1.0' in metrics
    stack.worker()
    assert poll_job(url, ok["id"])["status"] == "succeeded"
    metrics = wait_until(lambda: (t := requests.get(f"{url}/metrics").text)
                         and 'gnosis_jobs_finished_total{code="",outcome="succeeded"} 1.0' in t and t, timeout=10,
                         message="the outcome to be counted")
    assert 'gnosis_pages_processed_total{engine="tesseract"} 1.0' in metrics
    assert "gnosis_job_duration_seconds_count" in metrics
    assert 'gnosis_queue_depth{queue="ocr"} 0.0' in metrics


def test_readyz_tracks_redis(stack):
    url = stack.api()
    ready = requests.get(url + "/readyz").json()
    assert ready["status"] == "ready" and ready["redis"]["maxmemory_policy"] == "noeviction"
    # The tests' Redis may run without an AOF (this machine's does): only that is to be said of it.
    assert "maxmemory-policy" not in ready["redis"].get("warning", "")
    assert ("warning" in ready["redis"]) is (ready["redis"]["aof_enabled"] is False), ready
    dead = stack.api(REDIS_URL="redis://127.0.0.1:1/0", GNOSIS_REDIS_TIMEOUT="0.5")
    r = requests.get(dead + "/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json()["error"]["code"] == "redis_unavailable"
    assert requests.get(dead + "/healthz").status_code == 200
    r = requests.post(dead + "/v1/jobs", files={"file": ("a.png", text_image(["x"]))})
    assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_unavailable"


def test_openapi_lists_every_route(stack):
    url = stack.api()
    spec = requests.get(url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/cancel",
                 "/v1/cache", "/v1/cache/warm", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path


def test_metrics_give_an_autoscaler_pages_waiting_in_flight_and_per_key(stack):
    from gnosis_ocr.broker import queue_keys

    stack.env["GNOSIS_API_KEYS"] = "team-a,team-b"
    url = stack.api(GNOSIS_METRICS_OPEN="1")
    for key, n in (("team-a", 3), ("team-b", 1)):
        for i in range(n):
            r = requests.post(f"{url}/v1/jobs", files={"file": (f"{key}{i}.png", text_image([key]))},
                              headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 202, r.text

    def gauges() -> dict[str, float]:
        text = requests.get(f"{url}/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(("gnosis_queue_depth", "gnosis_pages_in_flight", "gnosis_key_pages_pending"))}

    waiting = gauges()
    assert waiting['gnosis_queue_depth{queue="ocr"}'] == 4 and waiting["gnosis_pages_in_flight"] == 0
    assert sorted(v for k, v in waiting.items() if k.startswith("gnosis_key_pages_pending")) == [1, 3]
    # KEDA's Redis scaler reads list lengths: the page queue's lists hold what the gauge says.
    assert sum(stack.redis.llen(k) for k in queue_keys("ocr")) == 4
    stack.worker(OCR_ENGINE="null")
    # A page's message is acknowledged just after the page is recorded: the last one leaves the in-flight
    # gauge a moment after the backlog gauges reach zero.
    wait_until(lambda: (g := gauges())['gnosis_queue_depth{queue="ocr"}'] == 0 and g["gnosis_pages_in_flight"] == 0
               and not any(v for k, v in g.items() if k.startswith("gnosis_key_pages_pending")),
               timeout=60, message="the backlog to drain and every page to be acknowledged")
