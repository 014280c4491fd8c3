"""A document through the whole service: submit, queue, OCR, poll, result, against real Redis, workers and HTTP."""

from __future__ import annotations

import time

import pytest
import requests

from gnosis_ocr.broker import OCR_PAGE_TASK, make_producer
from gnosis_ocr.job import JobStore
from gnosis_ocr.settings import Settings
from harness.docs import pdf_of_pages, text_image, words
from harness.stack import poll_job, wait_until

LINES = ["Quarterly report for Gnosis", "Revenue grew by forty percent", "Signed by the treasurer"]


@pytest.mark.parametrize("engine,model_id", [("tesseract", "tesseract"), ("rapidocr", "rapidocr-onnxruntime")])
def test_image_round_trip_on_the_cpu_engines(stack, engine, model_id):
    url = stack.api()
    stack.worker(OCR_ENGINE=engine)
    r = requests.post(f"{url}/v1/jobs", files={"file": ("scan.png", text_image(LINES))})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert job["pages_total"] == 1 and job["filename"] == "scan.png"

    final = poll_job(url, job["id"])
    assert final["status"] == "succeeded", final
    assert final["pages_done"] == 1 and final["started_at"] and final["finished_at"]

    result = requests.get(f"{url}/v1/jobs/{job['id']}/result").json()
    assert result["model"]["id"] == model_id
    assert [p["page"] for p in result["pages"]] == [1]
    expected = words(" ".join(LINES))
    assert len(expected & words(result["text"])) >= 0.8 * len(expected), result["text"]

    md = requests.get(f"{url}/v1/jobs/{job['id']}/result", params={"format": "markdown"})
    assert md.headers["Content-Type"].startswith("text/markdown")
    assert md.text == result["text"]
    via_accept = requests.get(f"{url}/v1/jobs/{job['id']}/result", headers={"Accept": "text/markdown"})
    assert via_accept.text == result["text"]


def test_pdf_pages_in_order_across_two_workers(stack, both_stores):
    url = stack.api()
    w1 = stack.worker()
    w2 = stack.worker()
    pages = [[f"Chapter {n} begins here", f"Page marker {word}"] for n, word in
             enumerate(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"], 1)]
    r = requests.post(f"{url}/v1/jobs", files={"file": ("book.pdf", pdf_of_pages(pages))})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["pages_total"] == 6

    seen = []

    def finished():
        job = requests.get(f"{url}/v1/jobs/{job_id}").json()
        if not seen or seen[-1] != job["pages_done"]:
            seen.append(job["pages_done"])
        return job["status"] == "succeeded" and job

    wait_until(finished, timeout=120, interval=0.02, message="the PDF job to succeed")
    assert seen == sorted(seen) and seen[-1] == 6
    assert any(0 < n < 6 for n in seen), f"pages_done never observed mid-way: {seen}"

    result = requests.get(f"{url}/v1/jobs/{job_id}/result").json()
    assert [p["page"] for p in result["pages"]] == [1, 2, 3, 4, 5, 6]
    for page, (_, marker) in zip(result["pages"], pages, strict=True):
        assert marker.split()[-1].lower() in page["text"].lower(), (marker, page["text"])
    # Both workers took pages: the job was split, not run by one process.
    assert "gnosis.ocr_page" in w1.log() and "gnosis.ocr_page" in w2.log()


def test_unknown_and_malformed_ids_are_404(stack):
    url = stack.api()
    for job_id in ["0" * 32, "not-a-job", "../../etc"]:
        r = requests.get(f"{url}/v1/jobs/{job_id}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
    assert requests.get(f"{url}/v1/jobs/{'0' * 32}/result").status_code == 404


def test_result_before_completion_is_409_and_cancelled_job_never_runs(stack):
    url = stack.api()  # no worker yet: the job stays queued
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(LINES))}).json()
    r = requests.get(f"{url}/v1/jobs/{job['id']}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"

    cancelled = requests.post(f"{url}/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    stack.worker()
    # The worker drains the queue; the cancelled page is skipped, never recognised.
    wait_until(lambda: stack.redis.llen("ocr") == 0 and stack.redis.hlen("unacked") == 0, timeout=30,
               message="the queue to drain")
    final = requests.get(f"{url}/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["started_at"] is None and final["attempts"] == 0
    r = requests.get(f"{url}/v1/jobs/{job['id']}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_cancelled"


def test_long_poll_returns_when_job_finishes(stack):
    url = stack.api()
    stack.worker()
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(LINES))}).json()
    final = requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=40).json()
    assert final["status"] == "succeeded"
    assert requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 31}).status_code == 400


def test_delete_removes_record_input_and_result(stack):
    url = stack.api()
    stack.worker()
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(LINES))}).json()
    assert poll_job(url, job["id"])["status"] == "succeeded"
    assert requests.delete(f"{url}/v1/jobs/{job['id']}").status_code == 204
    assert requests.get(f"{url}/v1/jobs/{job['id']}").status_code == 404
    assert not list(stack.redis.scan_iter(f"gnosis:job:{job['id']}*"))


def test_a_live_job_outlives_its_ttl_and_retention_starts_when_it_ends(stack):
    stack.env["GNOSIS_JOB_TTL"] = "2"
    url = stack.api()
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(LINES))}).json()
    submitted = time.monotonic()
    record, document = f"gnosis:job:{job['id']}", f"gnosis:job:{job['id']}:input"
    assert stack.redis.ttl(record) == -1 and stack.redis.ttl(document) == -1  # queued: kept, however long
    # A backlog longer than the TTL: the job waits past it and is still there.
    wait_until(lambda: time.monotonic() - submitted > 3 and requests.get(f"{url}/v1/jobs/{job['id']}").ok,
               timeout=10, message="the job to outlive its TTL while queued")
    stack.worker()
    assert poll_job(url, job["id"])["status"] == "succeeded"
    assert 0 < stack.redis.ttl(record) <= 2 and not stack.redis.exists(document)
    wait_until(lambda: requests.get(f"{url}/v1/jobs/{job['id']}").status_code == 404, timeout=10,
               message="the finished job to expire")


def test_a_job_past_its_max_age_fails_with_expired_and_is_kept(stack):
    url = stack.api(GNOSIS_JOB_TTL="60")
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="60", GNOSIS_JOB_MAX_AGE="1", GNOSIS_JOB_TTL="60")
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(LINES))}).json()
    final = poll_job(url, job["id"], timeout=30)
    assert final["status"] == "failed" and final["error"]["code"] == "expired", final
    assert "GNOSIS_JOB_MAX_AGE" in final["error"]["message"]
    assert 0 < stack.redis.ttl(f"gnosis:job:{job['id']}") <= 60
    assert stack.redis.zcard("gnosis:jobs:live") == 0 and int(stack.redis.get("gnosis:queued_bytes")) == 0


def test_a_multi_page_task_from_an_older_release_still_completes_in_order(stack):
    # Releases before cross-job batching could queue one task for a run of pages: (job, first, count).
    url = stack.api()
    worker = stack.worker()
    words_per_page = ["alpha", "bravo", "charlie"]
    pdf = pdf_of_pages([[f"Marker {word} here"] for word in words_per_page])
    job = JobStore(stack.redis, ttl=3600, max_attempts=3).create(data=pdf, kind="pdf", pages=3)
    make_producer(Settings.from_env({"REDIS_URL": stack.redis_url})).send_task(
        OCR_PAGE_TASK, args=[job.id, 0, 3], queue="ocr")
    final = poll_job(url, job.id, timeout=120)
    assert final["status"] == "succeeded" and final["pages_done"] == 3
    result = requests.get(f"{url}/v1/jobs/{job.id}/result").json()
    assert [p["page"] for p in result["pages"]] == [1, 2, 3]
    assert [p["truncated"] for p in result["pages"]] == [False] * 3
    for page, word in zip(result["pages"], words_per_page, strict=True):
        assert word in page["text"].lower(), (word, page["text"])
    assert sum("gnosis.ocr_page[" in line and "received" in line for line in worker.log().splitlines()) == 1
