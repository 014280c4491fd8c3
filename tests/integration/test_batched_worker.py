"""The batched GPU engine through the real service: a batched worker (one process, a threads pool feeding the engine's
continuous batch) on a tiny Qwen2.5-VL, with real Redis, Celery, gunicorn and HTTP."""

from __future__ import annotations

import json
import time

import pytest
import requests

from harness.docs import text_image
from harness.hubstub import TINY_REPO, HubStub
from harness.stack import metric_totals, poll_job, wait_until
from tests.integration.test_webhooks import Receiver, hooks_env

pytestmark = pytest.mark.slow


def batched(stack, hub: HubStub, *, tokens: int, slots: int = 4, **extra: str) -> None:
    stack.env.update({"OCR_ENGINE": "nanonets", "OCR_MODEL_ID": TINY_REPO, "HF_ENDPOINT": hub.url, "OCR_DEVICE": "cpu",
                      "OCR_MAX_NEW_TOKENS": str(tokens), "OCR_BATCH_SIZE": str(slots),
                      "OCR_REPETITION_WINDOW": "0", "GNOSIS_PREFETCH_PAGES": "1", **extra})


def submit(url: str, n: int, **data: str) -> dict:
    image = text_image([f"page {n}"], size=(300 + 40 * n, 200))
    r = requests.post(f"{url}/v1/jobs", files={"file": (f"p{n}.png", image)}, data=data)
    assert r.status_code == 202, r.text
    return r.json()


def in_flight(stack, worker) -> dict[str, dict]:
    key = next((k for k in stack.redis.scan_iter("gnosis:worker:*:inflight") if f"gnosis-{worker.pid}@" in k.decode()),
               None)
    return {f.decode(): json.loads(v) for f, v in stack.redis.hgetall(key).items()} if key else {}


def test_pages_of_many_jobs_are_decoded_together(stack, hub):
    from harness.stack import free_port

    batched(stack, hub, tokens=48)
    url = stack.api()
    port = free_port()
    worker = stack.worker(GNOSIS_WORKER_PORT=str(port))
    jobs = [submit(url, n) for n in range(8)]
    finals = [poll_job(url, job["id"], timeout=120) for job in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 8, finals
    for job in jobs:
        result = requests.get(f"{url}/v1/jobs/{job['id']}/result").json()
        # The tiny model never writes EOS: every page stops at the token cap, and says so.
        assert [p["truncated"] for p in result["pages"]] == [True]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    # Which paths each device runs, as its start-up checks decided: no FlashAttention kernel on a CPU.
    info = [line for line in text.splitlines() if line.startswith("gnosis_worker_device_info")]
    assert info == ['gnosis_worker_device_info{decode_attention="sdpa",device="cpu",norm="exact",patch_embed="linear",'
                    'prefill="serial",projections="stacked",vision_attention="batched"} 1.0'], info
    metrics = metric_totals(text)
    # More tokens than steps: several pages advanced in each step, from different jobs.
    assert metrics["gnosis_worker_decode_tokens_total"] > 1.5 * metrics["gnosis_worker_decode_steps_total"]
    assert metrics["gnosis_worker_batch_slots"] == 4
    # Where the device's time went: every page prefilled once, and both phases timed.
    assert metrics["gnosis_worker_prefill_pages_total"] == 8
    assert 1 <= metrics["gnosis_worker_prefills_total"] <= 8  # one page or a chunk each
    assert metrics["gnosis_worker_prefill_seconds_total"] > 0 and metrics["gnosis_worker_decode_seconds_total"] > 0
    # Cluster metrics are flushed in the background, a moment after the pages are recorded.
    cluster = wait_until(lambda: (t := requests.get(f"{url}/metrics").text).count(
        'gnosis_pages_truncated_total{reason="max_tokens"} 8.0') and t, timeout=10, message="the truncated count")
    assert "gnosis_page_first_token_seconds_count" in cluster and "gnosis_output_tokens_total" in cluster
    assert "(thread)" in worker.log()  # Celery's banner: one process, a threads pool


def test_a_killed_worker_requeues_every_page_of_its_batch(stack, hub):
    batched(stack, hub, tokens=1500, slots=3)
    url = stack.api()
    victim = stack.worker()
    jobs = [submit(url, n) for n in range(3)]
    wait_until(lambda: len(in_flight(stack, victim)) == 3, timeout=60, message="three pages in the batch")
    victim.kill_tree()  # the whole host is gone, mid-decode
    rescuer = stack.worker()
    finals = [poll_job(url, job["id"], timeout=120) for job in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 3, finals
    assert all(f["attempts"] == 2 for f in finals)
    assert "requeued 3 page(s)" in rescuer.log()


def test_a_cancelled_job_leaves_the_batch_and_its_webhook_does_not_wait(stack, hub):
    receiver = Receiver()
    try:
        hooks_env(stack)
        batched(stack, hub, tokens=4000, slots=2)
        url = stack.api()
        worker = stack.worker()
        # Fill both slots and every page thread with long pages; the first will be cancelled.
        busy = [submit(url, 0, callback_url=receiver.url), submit(url, 1)]
        wait_until(lambda: len(in_flight(stack, worker)) == 2, timeout=60, message="both slots busy")
        job = busy[0]
        cancelled_at = time.monotonic()
        assert requests.post(f"{url}/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        # The page leaves at the next step (its in-flight entry goes), long before its 1,500 tokens.
        wait_until(lambda: f"{job['id']}:0" not in in_flight(stack, worker), timeout=10,
                   message="the cancelled page to leave the batch")
        # The light worker posts the webhook while the other page still decodes.
        wait_until(lambda: receiver.calls, timeout=10, message="the cancel webhook")
        assert json.loads(receiver.calls[0][1])["status"] == "cancelled"
        assert f"{busy[1]['id']}:0" in in_flight(stack, worker), "the webhook waited for the other page"
        print(f"\ncancel -> page out of the batch and webhook delivered in {time.monotonic() - cancelled_at:.2f}s")
        assert poll_job(url, busy[1]["id"], timeout=120)["status"] == "succeeded"
    finally:
        receiver.stop()


def test_a_page_over_its_time_limit_fails_its_job_with_timeout(stack, hub):
    batched(stack, hub, tokens=4000, slots=2, GNOSIS_PAGE_SOFT_TIMEOUT="1", GNOSIS_PAGE_HARD_TIMEOUT="30")
    url = stack.api()
    worker = stack.worker()
    job = submit(url, 0)
    final = poll_job(url, job["id"], timeout=60)
    assert final["status"] == "failed" and final["error"]["code"] == "timeout", final
    # The job is failed first, then the page's in-flight entry cleared: the entry may outlive the answer
    # by a moment (seen in CI).
    wait_until(lambda: not in_flight(stack, worker), timeout=10, message="the page's in-flight entry to go")
    assert worker.alive()


@pytest.mark.parametrize("fail_release", [False, True], ids=["step", "release"])
def test_a_worker_whose_gpu_fails_returns_every_page_turns_unready_and_exits(stack, hub, fail_release):
    import sys
    import threading

    from harness.stack import Proc, free_port

    # Pages of different lengths: with a failing release, the first to finish brings the engine down.
    batched(stack, hub, tokens=400, slots=3, GNOSIS_PAGE_SOFT_TIMEOUT="120")
    url = stack.api()
    port = free_port()
    env = {**stack.env, "GNOSIS_WORKER_PORT": str(port), "GNOSIS_TEST_FAIL_AFTER_STEPS": "40",
           "GNOSIS_TEST_FAIL_RELEASE": "1" if fail_release else ""}
    victim = Proc([sys.executable, "-m", "tests.faulty_worker", "worker"], env, stack.tmp / "victim.log")
    stack.procs.append(victim)
    stack.wait_worker_ready(victim)
    seen: list[str] = []
    watching = threading.Event()

    def watch_readiness() -> None:
        while not watching.is_set() and victim.alive():
            try:
                seen.append(requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()["status"])
            except (requests.RequestException, ValueError):
                pass

    watcher = threading.Thread(target=watch_readiness, daemon=True)
    watcher.start()
    jobs = [submit(url, n) for n in range(4)]  # three decoding, one prefetched
    wait_until(lambda: not victim.alive(), timeout=60, message="the worker with the failed GPU to exit")
    died_at = time.monotonic()
    watching.set()
    assert victim.popen.returncode == 70, victim.log()[-3000:]
    assert "engine_dead" in seen and seen[0] == "ready", seen[:3] + seen[-3:]
    log = victim.log()
    assert "is dead" in log and "returning the page to the queue" in log
    rescuer = stack.worker()
    finals = [poll_job(url, job["id"], timeout=120) for job in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 4, finals
    # The dead engine gave its claims' attempts back: a death is counted apart (tests/unit/test_suspects.py).
    assert [f["attempts"] for f in finals] == [1] * 4, [f["attempts"] for f in finals]
    assert time.monotonic() - died_at < 120, "finished within the page deadline"
    assert "failed" not in [f["status"] for f in finals] and rescuer.alive()
    # Counted cluster-wide, for the GnosisEngineDied alert.
    deaths = metric_totals(requests.get(f"{url}/metrics", timeout=5).text).get("gnosis_engine_deaths_total")
    assert deaths == 1, deaths


def test_a_page_that_kills_every_engine_fails_alone_and_costs_the_pages_beside_it_nothing(stack, hub):
    """A page that leaves any GPU it runs on unusable (a sticky CUDA error, every time). Which page of a
    batch caused a death is not known, so every page on the device came back, and each paid an attempt:
    the pages batched with it three times failed `worker_lost` beside it. Now a death costs no attempt; the
    pages on the device come back as suspects, which share a device with few others, and after two deaths
    run alone. The page fails alone at the third death, and every other page succeeds at its first attempt."""
    import sys

    from harness.stack import Proc

    batched(stack, hub, tokens=400, slots=4, GNOSIS_PAGE_SOFT_TIMEOUT="120")
    url = stack.api()
    jobs = [submit(url, n) for n in range(6)]  # the first, 300 px wide, is the poison
    env = {**stack.env, "GNOSIS_TEST_POISON_WIDTH": "300"}
    workers: list[Proc] = []

    def statuses() -> list[str]:
        return [requests.get(f"{url}/v1/jobs/{job['id']}", timeout=10).json()["status"] for job in jobs]

    # A supervisor: a worker that exits is replaced, until every job has ended.
    while {"queued", "running"} & set(statuses()):
        if not workers or not workers[-1].alive():
            assert len(workers) <= 3, f"{len(workers)} engine deaths: the page was let stop more than three"
            workers.append(Proc([sys.executable, "-m", "tests.faulty_worker", "worker"], env,
                                stack.tmp / f"worker{len(workers)}.log"))
            stack.procs.append(workers[-1])
        wait_until(lambda: not workers[-1].alive() or not {"queued", "running"} & set(statuses()), timeout=120,
                   message="a worker to exit or every job to end")

    finals = [poll_job(url, job["id"], timeout=10) for job in jobs]
    wait_until(lambda: not any(w.alive() for w in workers[:3]), timeout=60, message="the third death's worker to exit")
    assert (finals[0]["status"], finals[0]["error"]["code"]) == ("failed", "engine_error"), finals[0]
    assert "the last time alone" in finals[0]["error"]["message"]
    assert [(f["status"], f["attempts"]) for f in finals[1:]] == [("succeeded", 1)] * 5, finals[1:]
    assert [w.popen.returncode for w in workers[:3]] == [70] * 3, [w.log()[-2000:] for w in workers]
    assert len(workers) <= 4
