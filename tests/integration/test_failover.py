"""Redis fails over while pages run, managed by Sentinel or by an operator's REPLICAOF: nothing accepted is
lost, and no worker stops."""

from __future__ import annotations

import signal
import time

import pytest
import redis
import requests

from gnosis_ocr import keys, replication
from harness.docs import text_image
from harness.redisproc import PrivateRedis, SentinelGroup, follow
from harness.stack import poll_job, wait_until
from tests.redisproxy import MovingProxy

pytestmark = pytest.mark.slow


def submit(url: str, name: str, timeout: float = 10) -> requests.Response:
    return requests.post(f"{url}/v1/jobs", files={"file": (name, text_image([f"failover {name}"]))}, timeout=timeout)


def test_a_sentinel_failover_while_pages_run_loses_no_accepted_job(stack, tmp_path):
    group = SentinelGroup(tmp_path / "sentinel").start()
    try:
        stack.env["REDIS_URL"] = group.url
        # A message popped from the dying primary, or published to it and never replicated, is gone
        # while its job's record survived: the reconciler publishes such pages again past its grace.
        stack.env["GNOSIS_RECONCILE_GRACE"] = "5"
        # A 202 only once the replica has the job, while one is connected: what the kill finds on the
        # primary alone was never acknowledged. The promoted replica, alone, accepts on its own.
        url = stack.api(GNOSIS_REDIS_TIMEOUT="1", GNOSIS_ACCEPT_REPLICAS="connected", GNOSIS_ACCEPT_REPLICAS_WAIT="0.5")
        worker = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.5", concurrency=2)
        jobs = [submit(url, f"before{i}.png").json()["id"] for i in range(8)]
        wait_until(lambda: requests.get(f"{url}/v1/jobs/{jobs[0]}").json()["status"] != "queued", timeout=30,
                   message="pages to be running")

        old_primary = group.primary_port()
        group.primary.stop(signal.SIGKILL)
        killed = time.monotonic()
        answers: list[int] = []

        def accepted_again():
            r = submit(url, f"during{len(answers)}.png")
            answers.append(r.status_code)
            assert r.status_code in (202, 503), r.text  # never a 500
            if r.status_code == 503:
                # Redis unreachable, or the new primary asked for the replica the old one had.
                assert int(r.headers["Retry-After"]) > 0
                assert r.json()["error"]["code"] in ("queue_unavailable", "redis_unreplicated")
            return r.status_code == 202 and r.json()["id"]

        jobs.append(wait_until(accepted_again, timeout=60, interval=0.2, message="the API to accept jobs again"))
        switched = time.monotonic() - killed
        assert group.primary_port() != old_primary

        lost = []
        for job_id in jobs:
            if requests.get(f"{url}/v1/jobs/{job_id}").status_code == 404:
                lost.append(job_id)  # accepted by the old primary, never replicated
                continue
            final = poll_job(url, job_id, timeout=120)
            assert final["status"] == "succeeded", final
        print(f"\nfailover: API accepting again after {switched:.1f}s ({answers.count(503)} x 503, "
              f"{answers.count(202)} x 202); {len(jobs) - len(lost)} jobs succeeded, {len(lost)} lost")
        assert not lost
        assert worker.alive()  # reconnected to the new primary by itself
    finally:
        group.stop()


def test_a_graceful_sentinel_failover_loses_no_job_accepted_under_connected(stack, tmp_path):
    """SENTINEL FAILOVER (maintenance) promotes the replica while the old primary, not yet told, takes
    writes for up to ten seconds, then drops them as it resynchronises from the new one. It has no
    replica meanwhile, so `connected` accepted on it alone: 34 of 110 jobs answered 202 were 404 after.
    Now such a primary is trusted only if the sentinels name it and have no failover under way."""
    import redis

    group = SentinelGroup(tmp_path / "sentinel").start()
    try:
        stack.env.update(REDIS_URL=group.url, GNOSIS_RECONCILE_GRACE="3")
        url = stack.api(GNOSIS_REDIS_TIMEOUT="1", GNOSIS_ACCEPT_REPLICAS="connected", GNOSIS_ACCEPT_REPLICAS_WAIT="0.5")
        stack.worker(OCR_ENGINE="null", concurrency=2)
        old = group.primary
        assert submit(url, "before.png").status_code == 202
        redis.Redis(port=group.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", SentinelGroup.MASTER)
        jobs: list[str] = []
        refused: list[str] = []

        def through_the_failover() -> bool:
            r = submit(url, f"during{len(jobs) + len(refused)}.png")
            assert r.status_code in (202, 503), r.text
            if r.status_code == 202:
                jobs.append(r.json()["id"])
            else:
                refused.append(r.json()["error"]["code"])
            resynced = redis.Redis(port=old.port).info("replication")["role"] == "slave"
            return resynced and group.primary_port() != old.port and len(jobs) >= 5

        wait_until(through_the_failover, timeout=90, interval=0.2, message="the old primary to follow the new one")
        lost = [j for j in jobs if requests.get(f"{url}/v1/jobs/{j}").status_code == 404]
        print(f"\ngraceful failover: {len(jobs)} accepted, {len(refused)} refused ({set(refused)}), {len(lost)} lost")
        assert not lost, f"{len(lost)} of {len(jobs)} jobs answered 202 were lost"
        assert set(refused) <= {"redis_unreplicated", "queue_unavailable"}
        finals = [poll_job(url, j, timeout=120) for j in jobs]
        assert [f for f in finals if f["status"] != "succeeded"] == []
    finally:
        group.stop()


def test_workers_on_a_primary_demoted_with_replicaof_reconnect_until_it_is_primary_again(stack, tmp_path):
    """An operator or a Kubernetes Redis operator swaps roles with REPLICAOF alone (Sentinel also kills the
    old primary's clients). Redis 7 then answers each blocked BRPOP with -UNBLOCKED, and each BRPOP sent to
    it afterwards with -READONLY; kombu calls both channel errors, and Celery stopped the page worker and
    its light worker with an "Unrecoverable error". They now reconnect until the node is primary again."""
    a = PrivateRedis(tmp_path / "a", appendonly=False).start()
    b = PrivateRedis(tmp_path / "b", appendonly=False).start()
    try:
        follow(b.port, a.port)
        stack.env["REDIS_URL"] = a.url
        url = stack.api()
        worker = stack.worker(OCR_ENGINE="null")
        wait_until(lambda: "gnosis-light-" in worker.log() and " ready" in worker.log(), timeout=60,
                   message="its light worker to consume")
        assert poll_job(url, submit(url, "before.png").json()["id"])["status"] == "succeeded"
        follow(a.port, b.port)  # the workers' node is a replica now, their BRPOPs blocked on it
        wait_until(lambda: worker.log().count("answered as a replica") >= 2 or not worker.alive(), timeout=60,
                   message="both workers to meet the new role")
        follow(b.port, a.port)
        job = submit(url, "after.png")
        assert job.status_code == 202, job.text
        assert poll_job(url, job.json()["id"])["status"] == "succeeded", worker.log()[-3000:]
        log = worker.log()
        assert worker.alive() and "Unrecoverable error" not in log and "light worker exited" not in log, log[-3000:]
    finally:
        b.stop()
        a.stop()


def test_a_page_whose_record_and_requeue_met_the_demotion_runs_again_on_the_new_primary(stack, pair):
    """The primary is demoted gracefully while a page runs: its record is refused (READONLY) through the
    worker's retries, and so is the return of its message to the queue (kombu logs "Couldn't reject"). The
    new primary has the page's claim, its in-flight entry and its unacknowledged message, and no worker runs
    it: the worker drops the entry, the reconciler returns the message, and the page runs again well within
    the broker's visibility timeout (13 minutes by default)."""
    primary, _, replica = pair
    endpoint = MovingProxy(primary.url)
    try:
        stack.env.update(REDIS_URL=endpoint.url, GNOSIS_RECONCILE_GRACE="2", GNOSIS_HEARTBEAT_INTERVAL="2",
                         GNOSIS_REDIS_RETRY="2")
        url = stack.api()
        worker = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="3")
        job = submit(url, "demoted.png")
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        old = redis.Redis(port=primary.port)
        wait_until(lambda: old.hget(keys.job(job_id), "status") == b"running", timeout=60,
                   message="the page to be claimed")
        assert replication.confirm(old, 1, 5.0) == 1
        follow(primary.port, replica.port)  # the old primary answers READONLY to every write from now on
        wait_until(lambda: "Couldn't reject" in worker.log(), timeout=60,
                   message="the record, then the message's return, to be refused")
        endpoint.move_to(replica.port)

        ended = poll_job(url, job_id, timeout=120)
        assert ended["status"] == "succeeded", ended
        assert ended["attempts"] == 2  # the claim on the old primary, and the run on the new one
        assert worker.alive() and "Unrecoverable error" not in worker.log()
    finally:
        endpoint.stop()
