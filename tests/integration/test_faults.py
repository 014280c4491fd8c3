"""Every job ends in a clear final state whatever happens to the processes around it."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis
import requests

from gnosis_ocr.broker import OCR_PAGE_TASK, make_producer
from gnosis_ocr.settings import Settings
from harness.docs import text_image
from harness.redisproc import PrivateRedis
from harness.stack import ROOT, poll_job, wait_until

pytestmark = pytest.mark.slow


def submit(url: str, name: str = "a.png") -> dict:
    r = requests.post(f"{url}/v1/jobs", files={"file": (name, text_image([f"fault drill {name}"]))})
    assert r.status_code == 202, r.text
    return r.json()


def inflight(client: redis.Redis, job_id: str) -> tuple[str, int] | None:
    """(worker name, pool process pid) running the job's page, if any."""
    for key in client.scan_iter("gnosis:worker:*:inflight"):
        raw = client.hget(key, f"{job_id}:0")
        if raw:
            return key.decode().split(":")[2], json.loads(raw)["pid"]
    return None


def test_a_bug_in_a_page_fails_its_job_at_once_instead_of_leaving_it_running(stack, tmp_path):
    # Whatever nothing in the worker expects (here: reading this host's copy of the input raises).
    shim = tmp_path / "bug"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "from gnosis_ocr.worker.local_copies import LocalCopies\n"
        "def get(self, job_id):\n"
        "    raise RuntimeError('a bug')\n"
        "LocalCopies.get = get\n")
    url = stack.api()
    worker = stack.worker(OCR_ENGINE="null", PYTHONPATH=f"{shim}{os.pathsep}{ROOT}")
    job = poll_job(url, submit(url)["id"], timeout=60)
    assert (job["status"], job["error"]["code"]) == ("failed", "internal_error"), job
    assert "RuntimeError: a bug" in worker.log()  # the reason is in the log, not in the client's answer
    assert "a bug" not in job["error"]["message"]


def test_pool_child_killed_mid_page_is_retried_promptly(stack):
    url = stack.api()
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="3")
    job = submit(url)
    _, pid = wait_until(lambda: inflight(stack.redis, job["id"]), timeout=30, message="the page to start")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    final = poll_job(url, job["id"], timeout=60)
    assert final["status"] == "succeeded" and final["pages_done"] == 1
    assert final["attempts"] == 2
    assert time.monotonic() - killed < 60


def test_whole_worker_killed_mid_page_is_recovered_by_another(stack, both_stores):
    url = stack.api()
    workers = [stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="3") for _ in range(2)]
    job = submit(url)
    name, _ = wait_until(lambda: inflight(stack.redis, job["id"]), timeout=30, message="the page to start")
    victim = next(w for w in workers if name.startswith(f"gnosis-{w.pid}@"))
    victim.kill_tree()  # main process, pool children: the host is gone
    killed = time.monotonic()
    final = poll_job(url, job["id"], timeout=60)
    recovered_in = time.monotonic() - killed
    print(f"\nwhole worker killed -> job succeeded in {recovered_in:.1f}s")
    assert final["status"] == "succeeded" and final["attempts"] == 2
    assert recovered_in < 60
    assert "requeued 1 page" in next(w for w in workers if w is not victim).log()

    # The broker redelivers the original message much later; it must change nothing.
    producer = make_producer(Settings.from_env({"REDIS_URL": stack.redis_url}))
    producer.send_task(OCR_PAGE_TASK, args=[job["id"], 0], queue="ocr")
    wait_until(lambda: stack.redis.llen("ocr") == 0 and not inflight(stack.redis, job["id"]), timeout=30,
               message="the late redelivery to be consumed")
    again = requests.get(f"{url}/v1/jobs/{job['id']}").json()
    assert again == final
    result = requests.get(f"{url}/v1/jobs/{job['id']}/result").json()
    assert [p["page"] for p in result["pages"]] == [1]


def test_page_that_always_kills_its_worker_fails_with_worker_lost(stack):
    url = stack.api()
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="30", GNOSIS_PAGE_MAX_ATTEMPTS="2")
    job = submit(url)
    killed: list[int] = []
    for _ in range(2):  # bounded: exactly the configured attempts
        _, pid = wait_until(lambda: (e := inflight(stack.redis, job["id"])) and e[1] not in killed and e,
                            timeout=30, message="the next delivery")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    final = poll_job(url, job["id"], timeout=60)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "worker_lost"
    assert final["attempts"] == 3
    wait_until(lambda: stack.redis.llen("ocr") == 0, timeout=10, message="no endless redelivery")


def test_soft_time_limit_fails_the_job_and_the_worker_goes_on(stack):
    url = stack.api()
    port_env = {"OCR_ENGINE": "null", "GNOSIS_NULL_ENGINE_DELAY": "5", "GNOSIS_PAGE_SOFT_TIMEOUT": "1",
                "GNOSIS_PAGE_HARD_TIMEOUT": "4"}
    worker = stack.worker(**port_env)
    first = submit(url, "slow1.png")
    _, child = wait_until(lambda: inflight(stack.redis, first["id"]), timeout=30, message="the page to start")
    final = poll_job(url, first["id"], timeout=30)
    assert final["status"] == "failed" and final["error"]["code"] == "timeout"
    assert "1 seconds" in final["error"]["message"]
    # The soft limit interrupts the page, not the process: the same pool process takes the next one.
    second = submit(url, "slow2.png")
    _, child2 = wait_until(lambda: inflight(stack.redis, second["id"]), timeout=30, message="the next page")
    assert child2 == child and worker.alive()
    assert poll_job(url, second["id"], timeout=30)["error"]["code"] == "timeout"


def test_redis_restart_loses_no_accepted_job(stack, tmp_path, both_stores):
    private = PrivateRedis(tmp_path / "redis").start()
    try:
        stack.env["REDIS_URL"] = private.url
        url = stack.api(GNOSIS_REDIS_TIMEOUT="1")
        worker = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="2")
        jobs = [submit(url, f"r{i}.png") for i in range(3)]
        wait_until(lambda: inflight(redis.Redis.from_url(private.url), jobs[0]["id"]), timeout=30,
                   message="the first page to run")

        private.stop(signal.SIGKILL)
        started = time.monotonic()
        r = requests.post(f"{url}/v1/jobs", files={"file": ("x.png", text_image(["down"]))}, timeout=10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        assert r.json()["error"]["code"] == "queue_unavailable"
        assert requests.get(f"{url}/v1/jobs/{jobs[0]['id']}", timeout=10).status_code == 503
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 503
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        assert time.monotonic() - started < 10  # answered, never hung

        private.start()  # same port, same directory: the AOF brings the jobs back
        for job in jobs:
            final = poll_job(url, job["id"], timeout=120)
            assert final["status"] == "succeeded", final
        assert worker.alive()  # reconnected by itself
        assert submit(url, "after.png")["status"] == "queued"
    finally:
        private.stop()


def test_a_worker_that_holds_a_page_and_waits_for_more_lives_through_redis_going_away(stack, tmp_path):
    """A worker with a page running and its BRPOP waiting for the next when Redis dies: Celery closes the
    broken connection twice (collect, then close). The first close failed on the dead BRPOP and left the
    channel open; the second tried to put the held page back through a transport already detached, and
    kombu's AttributeError was an "Unrecoverable error": the worker stopped as soon as its page ended
    (in a soak, 3 workers of 3 at one Redis restart)."""
    private = PrivateRedis(tmp_path / "redis").start()
    try:
        stack.env["REDIS_URL"] = private.url
        url = stack.api()
        # A page that ends while Redis is still away is published again by the reconciler, soon.
        worker = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="4", GNOSIS_RECONCILE_GRACE="2",
                              concurrency=2)
        job = submit(url, "held.png")
        wait_until(lambda: inflight(redis.Redis.from_url(private.url), job["id"]), timeout=30,
                   message="the page to run")
        private.stop(signal.SIGKILL)
        wait_until(lambda: worker.log().count("Connection to broker lost") >= 1, timeout=30,
                   message="the worker to lose its connection")
        private.start()
        assert poll_job(url, job["id"], timeout=120)["status"] == "succeeded"
        assert poll_job(url, submit(url, "after.png")["id"], timeout=60)["status"] == "succeeded"
        assert worker.alive() and "Unrecoverable error" not in worker.log(), worker.log()[-3000:]
    finally:
        private.stop()


def test_workers_whose_redis_connections_are_dropped_go_on_consuming(stack, tmp_path):
    """Connections dropped under a live Redis: a proxy's idle timeout, a network blip, `CLIENT KILL`, Redis's
    pub/sub output-buffer limit. Each worker process also holds a pub/sub subscription (Celery's remote
    control); redis-py reconnected it inside kombu's blocking read and read on, so the worker's event loop
    blocked for good: it consumed nothing more, while its heartbeat said it was alive, so nobody took its
    pages over."""
    from tests.integration.test_webhooks import Receiver, hooks_env

    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    hook = Receiver()
    try:
        client = redis.Redis.from_url(private.url)
        stack.env["REDIS_URL"] = private.url
        hooks_env(stack)
        url = stack.api()
        worker = stack.worker(OCR_ENGINE="null")

        def run(n: int, tag: str) -> list[str]:
            ids = [requests.post(f"{url}/v1/jobs", data={"callback_url": hook.url},
                                 files={"file": (f"{tag}{i}.png", text_image([f"dropped {tag}{i}"]))}).json()["id"]
                   for i in range(n)]
            return [poll_job(url, job_id, timeout=60)["status"] for job_id in ids]

        assert run(2, "before") == ["succeeded"] * 2
        wait_until(lambda: len(hook.calls) >= 2, timeout=60, message="the light worker's webhooks")
        for kind in ("pubsub", "normal"):
            assert client.client_kill_filter(_type=kind, skipme=True) > 0
        assert run(3, "after") == ["succeeded"] * 3, worker.log()[-3000:]
        # The light worker (webhooks) consumes again too.
        wait_until(lambda: len(hook.calls) >= 5, timeout=60, message="webhooks of the jobs after the drop")
        assert worker.alive() and "light worker exited" not in worker.log()
    finally:
        hook.stop()
        private.stop()


def test_a_page_running_when_the_broker_connection_drops_finishes_once(stack, tmp_path):
    """Celery can cancel the tasks running when its broker connection drops (Celery 6 will by default):
    a GPU page would then be thrown away and run again at every connection blip."""
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    try:
        client = redis.Redis.from_url(private.url)
        stack.env["REDIS_URL"] = private.url
        url = stack.api()
        worker = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="3")
        job_id = submit(url)["id"]
        wait_until(lambda: requests.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "running", timeout=30,
                   message="the page to run")
        for kind in ("pubsub", "normal"):
            client.client_kill_filter(_type=kind, skipme=True)
        job = poll_job(url, job_id, timeout=60)
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
        assert "Connection to broker lost" in worker.log()  # the drop reached the consumer mid-page
    finally:
        private.stop()


def test_a_worker_whose_broker_connection_dies_without_a_reset_consumes_again(stack, tmp_path):
    """A TCP path that dies without a reset (a firewall's or NAT's state dropped, a host gone without a
    word) leaves a worker's BRPOP waiting for a reply that never comes, its loop turning and its heartbeat
    beating on other connections: it took nothing more, for good with kombu before 5.7, and for up to 51 s
    with kombu's default checks (here 21 s: defaults.BROKER_HEALTH_CHECK_INTERVAL)."""
    from tests.redisproxy import SilencingProxy

    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    proxy = SilencingProxy(private.url, b"BRPOP")
    try:
        stack.env["REDIS_URL"] = private.url
        url = stack.api()
        worker = stack.worker(OCR_ENGINE="null", REDIS_URL=proxy.url)
        assert poll_job(url, submit(url, "before.png")["id"], timeout=60)["status"] == "succeeded"
        wait_until(lambda: proxy.carrying() >= 2, timeout=60, message="the page and light workers to consume")
        proxy.silence()
        wait_until(lambda: proxy.silenced() >= 2, timeout=15, message="both workers' BRPOPs to go silent")
        silenced = time.monotonic()
        job = poll_job(url, submit(url, "after.png")["id"], timeout=90)
        assert job["status"] == "succeeded", worker.log()[-3000:]
        assert "dropping stale connection" in worker.log() and worker.alive()
        print(f"\nconsuming again {time.monotonic() - silenced:.0f} s after the path died")
    finally:
        proxy.stop()
        private.stop()


def test_a_worker_whose_event_loop_stalls_exits_for_its_supervisor_and_a_fresh_one_serves(stack, tmp_path):
    """Behind the fix above, whatever else might block Celery's event loop for good: the heartbeat, in its
    own thread, sees the loop stand still while Redis answers, and the worker exits 70 and removes its
    record, instead of reporting itself alive while it takes nothing. The fix is taken out here (a
    sitecustomize shim) so that the loop stalls as it did."""
    shim = tmp_path / "stall"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import gnosis_ocr.worker.subscription as s\ns.install = lambda: None\n")
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    try:
        client = redis.Redis.from_url(private.url)
        # A BRPOP already sent may take the next message off the queue into a socket nobody reads any more:
        # the reconciler publishes such a page again once it is GNOSIS_RECONCILE_GRACE old.
        stack.env.update(REDIS_URL=private.url, GNOSIS_RECONCILE_GRACE="1")
        url = stack.api()
        stalling = stack.worker(OCR_ENGINE="null", GNOSIS_LOOP_STALL_TIMEOUT="3",
                                PYTHONPATH=f"{shim}{os.pathsep}{ROOT}")
        assert poll_job(url, submit(url, "before.png")["id"], timeout=60)["status"] == "succeeded"
        client.client_kill_filter(_type="pubsub", skipme=True)
        job = submit(url, "after.png")
        wait_until(lambda: not stalling.alive(), timeout=60, message="the stalled worker to exit")
        assert stalling.popen.returncode == 70, stalling.log()[-3000:]
        assert "event loop has not turned" in stalling.log()
        records = [k for k in client.scan_iter(f"gnosis:worker:gnosis-{stalling.pid}@*") if k.count(b":") == 2]
        assert records == [], records  # gone at once: the reaper need not wait for it to lapse
        stack.worker(OCR_ENGINE="null")  # what its supervisor does
        assert poll_job(url, job["id"], timeout=60)["status"] == "succeeded"
    finally:
        private.stop()


def test_hung_redis_gets_503_not_a_hang(stack, tmp_path):
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    try:
        stack.env["REDIS_URL"] = private.url
        url = stack.api(GNOSIS_REDIS_TIMEOUT="1")
        private.pause()
        started = time.monotonic()
        r = requests.post(f"{url}/v1/jobs", files={"file": ("x.png", text_image(["hang"]))}, timeout=20)
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert requests.get(f"{url}/readyz", timeout=20).status_code == 503
        assert time.monotonic() - started < 10
    finally:
        private.resume()
        private.stop()


def test_bounded_queue_answers_429(stack):
    url = stack.api(GNOSIS_MAX_QUEUE_DEPTH="3")
    for i in range(3):
        submit(url, f"q{i}.png")
    r = requests.post(f"{url}/v1/jobs", files={"file": ("q.png", text_image(["full"]))})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.json()["error"]["code"] == "queue_full"
    assert len(list(stack.redis.scan_iter("gnosis:job:*:input"))) == 3  # the refused one left nothing


def test_the_queue_bound_counts_a_job_published_across_a_reading_once(redis_url, monkeypatch):
    # The API reads the queue's length at most every DEPTH_TTL seconds and counts its own pages between
    # readings. A job whose publish outlasted the reading's lifetime was counted twice (in the fresh
    # reading and again as added): a queue with room answered 429 (seen in CI, under load).
    import gnosis_ocr.api as api
    from gnosis_ocr.api import create_app

    clock = [100.0]
    monkeypatch.setattr(api.time, "monotonic", lambda: clock[0])
    c = create_app(Settings.from_env({"REDIS_URL": redis_url})).extensions["gnosis"]
    assert c.queue_depth() == 0  # a reading at t = 100.0
    clock[0] += 0.1
    published = clock[0]
    redis.Redis.from_url(redis_url).lpush(c.settings.queue, b"a page")  # the job's one message
    clock[0] += api.DEPTH_TTL  # a slow publish: the reading has expired by its end
    c.enqueued(1, since=published)
    assert c.queue_depth() == 1  # the next submission's check: one page waiting, not two
    clock[0] += 0.01
    c.enqueued(1, since=clock[0] - 0.005)  # a job published after that reading is added to it
    assert c.queue_depth() == 2


def test_hard_time_limit_fails_the_job_instead_of_leaving_it_running(redis_url, monkeypatch):
    # Celery calls the task's on_failure in the worker's main process after killing a pool process
    # stuck past the hard limit (a C extension ignoring the soft signal); this drives that hook.
    from billiard.exceptions import TimeLimitExceeded

    monkeypatch.setenv("REDIS_URL", redis_url)
    from gnosis_ocr.job import JobStore
    from gnosis_ocr.worker import runtime, tasks

    store = JobStore(redis.Redis.from_url(redis_url), ttl=60, max_attempts=3)
    job = store.create(data=b"x", kind="png", pages=1)
    assert store.start_page(job.id, 0, inflight=("gnosis:test:inflight", f"{job.id}:0", "{}")).verdict == "run"
    runtime._runtime = None  # this test's REDIS_URL
    tasks.ocr_page.on_failure(TimeLimitExceeded(360), "task-id", (job.id, 0), {}, None)
    final = store.get(job.id)
    assert final.status.value == "failed" and final.error_code == "timeout"
    assert "hard time limit" in final.error_message
