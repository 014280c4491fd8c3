"""Redis under pressure, as an operator meets it on day 2: nearly full, or configured to evict. Accepted
work always finishes; new work is refused cleanly before Redis refuses writes; an evicting Redis is
named loudly. Real Redis (a private one, so its limits can be set), real API and worker processes."""

from __future__ import annotations

import contextlib
import os
import re

import pytest
import redis
import requests

from harness.docs import pdf_of_pages, text_image
from harness.redisproc import PrivateRedis
from harness.stack import free_port, poll_job, wait_until

pytestmark = pytest.mark.slow


def noisy_png(seed: int, size: int = 120_000) -> bytes:
    """A valid PNG of about `size` bytes that does not compress: its bytes are what fills Redis."""
    import io

    from PIL import Image

    side = int((size / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def test_a_nearly_full_redis_refuses_new_jobs_cleanly_and_every_accepted_job_finishes(stack, tmp_path):
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    try:
        client = redis.Redis.from_url(private.url)
        client.config_set("maxmemory", client.info("memory")["used_memory"] + 8 * 2**20)
        stack.env["REDIS_URL"] = private.url
        url = stack.api()
        accepted, refused = [], []
        for n in range(150):
            r = requests.post(f"{url}/v1/jobs", files={"file": (f"{n}.png", noisy_png(n))}, timeout=30)
            assert r.status_code in (202, 503), r.text
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            else:
                assert r.json()["error"]["code"] == "redis_full" and int(r.headers["Retry-After"]) > 0
                refused.append(n)
                if len(refused) >= 5:
                    break
        memory = client.info("memory")
        print(f"\naccepted {len(accepted)}, refused {len(refused)}; Redis at {memory['used_memory']} of "
              f"{memory['maxmemory']} bytes")
        assert len(accepted) >= 20 and refused, "the bound is well before Redis's own limit"
        assert memory["used_memory"] < 0.9 * memory["maxmemory"], f"headroom left ({len(accepted)} accepted)"
        stack.worker(OCR_ENGINE="null", concurrency=2)
        finals = [poll_job(url, job_id, timeout=120) for job_id in accepted]
        assert [f["status"] for f in finals] == ["succeeded"] * len(accepted)
        r = requests.post(f"{url}/v1/jobs", files={"file": ("after.png", text_image(["room again"]))}, timeout=30)
        assert r.status_code == 202, "room again once the accepted jobs are done"
    finally:
        private.stop()


def test_an_evicting_redis_without_an_aof_is_named_in_the_logs_and_in_readiness(stack, tmp_path):
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start(["--maxmemory-policy", "allkeys-lru"])
    safe = PrivateRedis(tmp_path / "safe").start()  # AOF on, noeviction: nothing to say
    try:
        stack.env["REDIS_URL"] = private.url
        url = stack.api()
        port = free_port()
        worker = stack.worker(OCR_ENGINE="null", GNOSIS_WORKER_PORT=str(port))
        api_ready = requests.get(f"{url}/readyz", timeout=10).json()
        assert api_ready["redis"]["maxmemory_policy"] == "allkeys-lru" and "noeviction" in api_ready["redis"]["warning"]
        assert api_ready["redis"]["aof_enabled"] is False and "appendonly yes" in api_ready["redis"]["warning"]
        worker_ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        assert "noeviction" in worker_ready["redis"]["warning"] and "no AOF" in worker_ready["redis"]["warning"]
        api_log = next(p for p in stack.procs if "api" in p.log_path.name).log()
        assert "maxmemory-policy is allkeys-lru" in api_log and "Redis writes no AOF" in api_log
        wait_until(lambda: "maxmemory-policy is allkeys-lru" in worker.log() and "no AOF" in worker.log(),
                   timeout=10, message="the worker's lines")
        safe_ready = requests.get(f"{stack.api(REDIS_URL=safe.url)}/readyz", timeout=10).json()
        assert safe_ready["redis"]["aof_enabled"] is True and "warning" not in safe_ready["redis"], safe_ready
    finally:
        private.stop()
        safe.stop()


def test_the_api_says_at_start_whether_api_keys_are_on(stack):
    stack.api()
    stack.api(GNOSIS_API_KEYS="k-123")
    logs = [p.log() for p in stack.procs]
    assert "API keys are off" in logs[0] and "API keys are on (1 key(s))" in logs[1]


def test_after_a_redis_outage_workers_are_ready_again_and_no_page_runs_twice(stack, tmp_path):
    import signal
    import time

    private = PrivateRedis(tmp_path / "redis").start()  # AOF on: the records survive, their TTLs run out
    try:
        stack.env["REDIS_URL"] = private.url
        url = stack.api(GNOSIS_REDIS_TIMEOUT="1")
        ports = [free_port(), free_port()]
        # A loop-stall limit shorter than the outage: reconnecting through it is no stall (worker/loopwatch.py).
        workers = [stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="12", GNOSIS_WORKER_PORT=str(p),
                                GNOSIS_LOOP_STALL_TIMEOUT="4") for p in ports]
        job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["across the gap"]))}).json()
        client = redis.Redis.from_url(private.url)
        wait_until(lambda: any(client.hlen(k) for k in client.scan_iter("gnosis:worker:*:inflight")), timeout=30,
                   message="the page to start")

        private.stop(signal.SIGTERM)
        # The outage itself, 8 s: longer than a worker record's lifetime (three beats of 1 s), so every
        # record has expired when Redis returns (its clock ran on). A fault's length, not a wait for a state.
        ends = time.monotonic() + 8
        wait_until(lambda: time.monotonic() > ends, timeout=20, interval=0.5, message="the outage to last 8 s")
        private.start()
        back = time.monotonic()

        def ready(port: int) -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        for port in ports:
            wait_until(lambda p=port: ready(p), timeout=30, message=f"worker on {port} ready again")
        print(f"\nboth workers ready {time.monotonic() - back:.1f}s after Redis returned")
        final = poll_job(url, job["id"], timeout=60)
        assert final["status"] == "succeeded" and final["attempts"] == 1, final
        assert not any("requeued" in w.log() for w in workers), "nobody was reaped across the gap"
        assert all(w.alive() and "event loop has not turned" not in w.log() for w in workers)
    finally:
        private.stop()


def _page_messages(client: redis.Redis, queue: str = "ocr") -> list[tuple[str, bytes]]:
    from gnosis_ocr.broker import queue_keys

    return [(key, raw) for key in queue_keys(queue) for raw in client.lrange(key, 0, -1)]


def test_a_page_whose_message_was_lost_is_published_again_and_runs_once(stack):
    import json as _json

    url = stack.api()
    jobs = [requests.post(f"{url}/v1/jobs", files={"file": (f"{n}.png", text_image([f"lost {n}"]))}).json()
            for n in range(2)]
    # What BRPOP followed by a refused unacked write leaves: the message is gone, START_PAGE never ran.
    key, raw = next((k, r) for k, r in _page_messages(stack.redis) if jobs[0]["id"] in _json.dumps(
        _json.loads(r)["headers"].get("argsrepr", "")))
    assert stack.redis.lrem(key, 1, raw) == 1
    worker = stack.worker(OCR_ENGINE="null", GNOSIS_RECONCILE_GRACE="1")
    finals = [poll_job(url, job["id"], timeout=90) for job in jobs]
    assert [f["status"] for f in finals] == ["succeeded", "succeeded"], finals
    assert [f["attempts"] for f in finals] == [1, 1], "each page ran once"
    assert "published 1 lost page(s) again" in worker.log()


def test_a_page_running_through_the_reconcilers_passes_keeps_its_entry_and_runs_once(stack):
    """Every beat a worker drops its in-flight entries that no delivery it holds wrote (a failover lost
    their ending). A page still running keeps its entry, so the reconciler never takes it for lost and
    runs a second copy beside it."""
    url = stack.api()
    worker = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="15", GNOSIS_RECONCILE_GRACE="1")
    job = requests.post(f"{url}/v1/jobs", files={"file": ("long.png", text_image(["a long page"]))}).json()
    final = poll_job(url, job["id"], timeout=90)  # two passes of the reconciler, 6 s apart, while it runs
    assert final["status"] == "succeeded" and final["attempts"] == 1, final
    assert "in-flight entr" not in worker.log() and "lost page" not in worker.log()


def test_a_lost_page_of_a_busy_key_is_published_again_at_that_keys_priority(stack):
    """A copy published without a priority would run ahead of every key's pages, a small key's too."""
    from celery import Celery

    from gnosis_ocr.broker import PRIORITY_SEP, celery_config
    from gnosis_ocr.settings import Settings
    from gnosis_ocr.worker.reconcile import Reconciler

    stack.env["GNOSIS_API_KEYS"] = "big-key"
    url = stack.api()
    big = {"Authorization": "Bearer big-key"}
    jobs = [requests.post(f"{url}/v1/jobs", files={"file": (f"{n}.png", text_image([f"big {n}"]))},
                          headers=big).json()["id"] for n in range(12)]
    last = jobs[-1]  # submitted with 11 of the key's pages waiting: priority step 3
    key, raw = next((k, r) for k, r in _page_messages(stack.redis) if last in r.decode())
    assert key == f"ocr{PRIORITY_SEP}3"
    assert stack.redis.lrem(key, 1, raw) == 1

    app = Celery("reconcile-test")
    app.conf.update(celery_config(Settings.from_env({"REDIS_URL": stack.redis_url})))
    reconciler = Reconciler(stack.redis, app, queue="ocr", grace=0)
    assert reconciler.run() == 0, "a page missing on one pass only is not yet lost"
    assert reconciler.run() == 1
    again = [k for k, r in _page_messages(stack.redis) if last in r.decode()]
    assert again == [f"ocr{PRIORITY_SEP}3"], "published again behind the small keys' pages, as it was"

    stack.worker(OCR_ENGINE="null")
    finals = [poll_job(url, job_id, timeout=90, headers=big) for job_id in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * len(jobs)
    assert finals[-1]["attempts"] == 1, "the page ran once"


def test_a_lost_page_is_published_again_beside_a_page_recorded_as_cut_short(stack):
    """A page's record says whether its output was cut short (the token cap, the repetition guard), as a flag
    beside the pages' texts. The reconciler read that flag as a page number and failed its every pass, so
    while any live job had a truncated page, no lost page of any job was published again: the batched
    worker's soak left a job `running` with one page never run."""
    import secrets

    from celery import Celery

    from gnosis_ocr.broker import celery_config
    from gnosis_ocr.job import JobStore
    from gnosis_ocr.settings import Settings
    from gnosis_ocr.worker.reconcile import Reconciler

    url = stack.api()
    pdf = pdf_of_pages([["the first page, cut short"], ["the second page, whose message is lost"]])
    job_id = requests.post(f"{url}/v1/jobs", files={"file": ("two.pdf", pdf)}).json()["id"]
    # What a worker does with the first page: claim it and record its text, cut short at the token cap.
    jobs, token = JobStore(stack.redis, ttl=3600, max_attempts=3), secrets.token_hex(8)
    entry = ("gnosis:worker:test:inflight", f"{job_id}:0", "{}")
    assert jobs.start_page(job_id, 0, inflight=entry, token=token).verdict.value == "run"
    assert jobs.finish_page(job_id, 0, "the first page, cut", model_id="m", model_revision="r", inflight=entry,
                            truncated=True, token=token).outcome.value == "recorded"
    for key, raw in _page_messages(stack.redis):  # both pages' messages: the first ran, the second is lost
        if job_id in raw.decode():
            assert stack.redis.lrem(key, 1, raw) == 1

    app = Celery("reconcile-test")
    app.conf.update(celery_config(Settings.from_env({"REDIS_URL": stack.redis_url})))
    reconciler = Reconciler(stack.redis, app, queue="ocr", grace=0)
    assert reconciler.run() == 0, "a page missing on one pass only is not yet lost"
    assert reconciler.run() == 1, "the second page is published again"
    assert [job_id in raw.decode() for _, raw in _page_messages(stack.redis)] == [True]

    stack.worker(OCR_ENGINE="null")
    final = poll_job(url, job_id, timeout=90)
    assert (final["status"], final["pages_done"]) == ("succeeded", 2), final
    result = requests.get(f"{url}/v1/jobs/{job_id}/result").json()
    assert [p["truncated"] for p in result["pages"]] == [True, False]


def test_a_failing_housekeeping_duty_is_counted_and_the_others_still_run(stack):
    """A duty that raises at every pass (here the expiry of overdue jobs) once took every duty after it down
    with it: with the reconciler failing so, no lost page, webhook or batch was recovered, and only a log
    line said so. Now each duty runs apart, and a failing one is counted for an alert."""
    import json as _json
    import sys

    from harness.stack import Proc, metric_totals

    url = stack.api()
    job = requests.post(f"{url}/v1/jobs", files={"file": ("lost.png", text_image(["lost"]))}).json()
    key, raw = next((k, r) for k, r in _page_messages(stack.redis) if job["id"] in _json.dumps(
        _json.loads(r)["headers"].get("argsrepr", "")))
    assert stack.redis.lrem(key, 1, raw) == 1  # its message lost: only the reconciler can run it
    env = {**stack.env, "OCR_ENGINE": "null", "GNOSIS_RECONCILE_GRACE": "1", "GNOSIS_TEST_FAILING_DUTY": "expire"}
    worker = Proc([sys.executable, "-m", "tests.faulty_worker", "worker"], env, stack.tmp / "worker.log")
    stack.procs.append(worker)
    final = poll_job(url, job["id"], timeout=90)
    assert (final["status"], final["attempts"]) == ("succeeded", 1), final
    assert "housekeeping: expire failed; the other duties go on" in worker.log()
    assert "published 1 lost page(s) again" in worker.log()
    failures = wait_until(lambda: metric_totals(requests.get(f"{url}/metrics", timeout=5).text).get(
        "gnosis_housekeeping_failures_total"), timeout=30, message="the failures counted")
    assert failures >= 1
    assert 'gnosis_housekeeping_failures_total{duty="expire"}' in requests.get(f"{url}/metrics", timeout=5).text


@contextlib.contextmanager
def full_while_consuming(stack, tmp_path, jobs: int, **worker_env: str):
    """A worker consuming `jobs` one-page jobs from a private Redis, which then refuses writes: yields
    (client, api url, job ids, worker)."""
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    try:
        client = redis.Redis.from_url(private.url)
        stack.env.update(REDIS_URL=private.url, GNOSIS_RECONCILE_GRACE="1")
        url = stack.api()
        worker = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.3", **worker_env)
        wait_until(lambda: re.search(r"gnosis-light-\S+ ready", worker.log()), timeout=60,
                   message="its light worker to consume")
        ids = [requests.post(f"{url}/v1/jobs", files={"file": (f"{n}.png", text_image([f"full {n}"]))}).json()["id"]
               for n in range(jobs)]
        wait_until(lambda: client.hlen("unacked"), timeout=30, message="the worker to consume")
        refuse_writes(client)  # pages finish and the next ones are taken while Redis is full
        wait_until(lambda: "Redis refuses writes" in worker.log() or not worker.alive(), timeout=60,
                   message="the worker to meet the refusal")
        yield client, url, ids, worker
    finally:
        private.stop()


def test_a_consuming_worker_rides_out_redis_refusing_writes_and_every_page_finishes(stack, tmp_path):
    """kombu's Redis transport acknowledges in a MULTI, which Redis refuses whole while it is out of
    memory (even the ZREM and HDEL that would free some), and records every message it takes with a
    write Redis refuses then: either escaped into Celery's loop as an "Unrecoverable error", and every
    worker finishing or taking a page during the episode stopped (three of three within 2 s here)."""
    with full_while_consuming(stack, tmp_path, 12, concurrency=2) as (client, url, jobs, worker):
        assert worker.alive(), worker.log()[-3000:]
        client.config_set("maxmemory", 0)
        finals = [poll_job(url, job_id, timeout=120) for job_id in jobs]
        assert [f["status"] for f in finals] == ["succeeded"] * len(jobs), [f["status"] for f in finals]
        # The page worker lived through it. (Its light worker once stopped here under a loaded machine: a
        # reconnect binding its queues in a MULTI, the case the reconnect test below covers.)
        assert worker.alive() and "Redis takes writes again" in worker.log()


def test_a_worker_waiting_for_redis_to_take_writes_still_stops_on_sigterm(stack, tmp_path):
    """The wait holds Celery's loop; a supervisor's SIGTERM must still end the worker, and nothing it held
    is lost."""
    import signal

    # A page whose text is in hand when Redis fills retries recording it for GNOSIS_REDIS_RETRY (60 s by
    # default, well inside a deploy's grace period) before its message goes back: 10 s here, so that the
    # stop within 30 s below is the loop's wait giving way, not the page's retries running out.
    with full_while_consuming(stack, tmp_path, 8, GNOSIS_REDIS_RETRY="10") as (client, url, jobs, worker):
        worker.popen.send_signal(signal.SIGTERM)
        wait_until(lambda: not worker.alive(), timeout=30, message="the worker to stop on SIGTERM")
        client.config_set("maxmemory", 0)
        stack.worker(OCR_ENGINE="null")
        finals = [poll_job(url, job_id, timeout=120) for job_id in jobs]
        assert [f["status"] for f in finals] == ["succeeded"] * len(jobs), [f["status"] for f in finals]


def test_a_worker_that_reconnects_while_redis_refuses_writes_waits_instead_of_stopping(stack, tmp_path):
    """A connection dropped mid-life (a proxy, a network blip) makes Celery declare and bind its queues
    again, and kombu does both in a MULTI, which a full Redis refuses whole, even its reads (LLEN): that
    reconnect stopped the worker, and its light worker, with an "Unrecoverable error"."""
    with full_while_consuming(stack, tmp_path, 12) as (client, url, jobs, worker):
        # Far enough under: the buffers the killed connections free must not make room again.
        client.config_set("maxmemory", max(client.info("memory")["used_memory"] // 2, 2**16))
        for kind in ("normal", "pubsub"):
            client.client_kill_filter(_type=kind, skipme=True)
        # The idle light worker reconnects at once (the page worker may still be waiting to record a message).
        wait_until(lambda: any(said in worker.log() for said in ("waiting for room before binding",
                                                                  "light worker exited", "Unrecoverable error"))
                   or not worker.alive(), timeout=60, message="a worker to reconnect")
        assert "waiting for room before binding" in worker.log() and worker.alive(), worker.log()[-3000:]
        client.config_set("maxmemory", 0)
        finals = [poll_job(url, job_id, timeout=120) for job_id in jobs]
        assert [f["status"] for f in finals] == ["succeeded"] * len(jobs), [f["status"] for f in finals]
        log = worker.log()
        assert worker.alive() and "Unrecoverable error" not in log, log[-3000:]
        assert "light worker exited" not in log, log[-3000:]


def refuse_writes(client: redis.Redis) -> None:
    """Out of memory under noeviction: every write that could grow the data set is refused; reads go on."""
    client.config_set("maxmemory", max(client.info("memory")["used_memory"] - 2**16, 2**16))


def test_a_worker_started_while_redis_refuses_writes_waits_and_consumes_once_it_has_room(stack, tmp_path):
    """Celery's Redis transport writes a mutex as it starts consuming and calls a refusal unrecoverable:
    a worker (re)started during an out-of-memory episode stopped at once, and its supervisor restarted it
    into the same refusal, backing off longer each time."""
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    try:
        client = redis.Redis.from_url(private.url)
        stack.env["REDIS_URL"] = private.url
        url = stack.api()
        job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["waits for room"]))}, timeout=30)
        assert job.status_code == 202, job.text
        refuse_writes(client)
        worker = stack.worker(OCR_ENGINE="null", wait_ready=False)
        wait_until(lambda: worker.log().count("waiting for room before consuming") >= 2, timeout=60,
                   message="the worker and its light worker to wait for Redis")  # the page worker and its sidecar
        assert worker.alive()
        client.config_set("maxmemory", 0)
        stack.wait_worker_ready(worker)
        assert poll_job(url, job.json()["id"], timeout=60)["status"] == "succeeded"
        assert "Unrecoverable error" not in worker.log() and worker.alive()
    finally:
        private.stop()


def test_a_worker_that_celery_stops_with_an_unrecoverable_error_exits_non_zero_for_its_supervisor(stack,
                                                                                                   acl_redis):
    """Celery's worker_main drops the worker's exit code: a worker Celery stopped left with 0, which a
    restart-on-failure supervisor takes for a finished job. Here kombu's restore mutex (`unacked_mutex`,
    written as it starts consuming) is outside the worker's ACL, a refusal that is no memory pressure,
    so the worker does not wait for it: Celery stops the worker, which must exit 1."""
    admin, worker_url = acl_redis
    everything_but_the_mutex = ["[^u]*", "u[^n]*", "un[^a]*", "unacked", "unacked_index"]
    admin.acl_setuser("worker", enabled=True, reset_keys=True, keys=everything_but_the_mutex)
    worker = stack.worker(OCR_ENGINE="null", REDIS_URL=worker_url, wait_ready=False)
    wait_until(lambda: not worker.alive(), timeout=60, message="the worker to stop")
    assert "Unrecoverable error: auth:NoPermissionError" in worker.log()
    assert worker.popen.returncode == 1, worker.log()[-2000:]
