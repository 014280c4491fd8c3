"""GNOSIS_ACCEPT_REPLICAS: a 202 means the job is on a replica, so losing the primary the next moment
loses nothing; a job no replica confirms is refused (503) and kept nowhere.

The replica follows its primary through a proxy that can hold the replication stream back (`pair`, in
conftest): the replica falls behind while the primary goes on taking writes, as a slow link or a busy
replica would. Then the primary dies and the replica is promoted, as Sentinel or Memorystore's failover
would do.
"""

from __future__ import annotations

import signal

import pytest
import redis
import requests

from gnosis_ocr import keys, replication
from harness.docs import text_image
from harness.redisproc import PrivateRedis
from harness.stack import poll_job, wait_until
from tests.redisproxy import HoldingProxy


def submit(url: str, name: str) -> requests.Response:
    return requests.post(f"{url}/v1/jobs", files={"file": (name, text_image([f"replicated {name}"]))}, timeout=10)


def fail_over(primary: PrivateRedis, link: HoldingProxy, replica: PrivateRedis) -> None:
    """The primary dies with what it had not sent; the replica becomes the primary."""
    primary.stop(signal.SIGKILL)
    link.cut()
    redis.Redis(port=replica.port).replicaof("NO", "ONE")


def test_a_confirmation_covers_writes_other_connections_made(pair):
    """WAIT alone counts only its own connection's writes: a pooled connection that wrote nothing since
    it connected is told at once that every replica is in sync."""
    primary, link, _ = pair
    writer, bystander, checker = (redis.Redis(port=primary.port) for _ in range(3))
    bystander.ping()  # connected before the write, as pooled connections are
    checker.ping()
    link.hold()
    writer.set("written-elsewhere", "1")
    assert replication.confirm(checker, 1, 0.2) == 0
    assert bystander.execute_command("WAIT", 1, 200) == 1  # the trap the confirmation avoids
    link.release()
    assert replication.confirm(checker, 1, 2.0) == 1


def test_without_accept_replicas_a_job_answered_202_is_lost_when_the_primary_dies_before_its_replica_had_it(
        stack, pair):
    """The risk the setting removes (docs/operations.md): the default answers once the primary has the job."""
    primary, link, replica = pair
    stack.env["REDIS_URL"] = primary.url
    url = stack.api()
    link.hold()
    accepted = submit(url, "unconfirmed.png")
    assert accepted.status_code == 202, accepted.text
    fail_over(primary, link, replica)
    stack.env["REDIS_URL"] = replica.url
    after = stack.api()
    assert requests.get(f"{after}/v1/jobs/{accepted.json()['id']}", timeout=10).status_code == 404


@pytest.mark.parametrize("policy", ["1", "connected"])
def test_with_accept_replicas_a_job_no_replica_confirms_is_refused_and_one_answered_202_survives_the_failover(
        stack, pair, policy):
    primary, link, replica = pair
    stack.env.update(REDIS_URL=primary.url, GNOSIS_ACCEPT_REPLICAS=policy, GNOSIS_ACCEPT_REPLICAS_WAIT="0.5")
    url = stack.api(GNOSIS_BATCH_BUCKETS="gs://in/,gs://out/")
    ready = requests.get(f"{url}/readyz", timeout=10).json()
    assert ready["redis"]["replication"] == {"accept_replicas": policy, "connected_replicas": 1}

    link.hold()  # the replica stays connected and falls behind
    refused = submit(url, "unconfirmed.png")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "redis_unreplicated" and int(refused.headers["Retry-After"]) > 0
    # Nothing of it was kept: no record, no live job, no queued bytes counted against the bound.
    on_primary = redis.Redis(port=primary.port)
    assert not list(on_primary.scan_iter(keys.job("*")))
    assert on_primary.zcard(keys.LIVE_JOBS) == 0 and int(on_primary.get(keys.QUEUED_BYTES) or 0) == 0
    batch = requests.post(f"{url}/v1/batches", json={"source": "gs://in/docs/", "destination": "gs://out/md/"},
                          timeout=10)
    assert batch.status_code == 503 and batch.json()["error"]["code"] == "redis_unreplicated", batch.text
    assert not list(on_primary.scan_iter(keys.batch("*"))) and on_primary.zcard(keys.BATCHES_UNLISTED) == 0
    wait_until(lambda: 'gnosis_submissions_unreplicated_total{kind="job"} 1.0' in
               requests.get(f"{url}/metrics", timeout=10).text, timeout=15, message="the refusal to be counted")

    link.release()
    accepted = submit(url, "confirmed.png")
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    fail_over(primary, link, replica)  # at once: no time for anything to catch up after the 202

    stack.env["REDIS_URL"] = replica.url
    after = stack.api()
    stack.worker(OCR_ENGINE="null")
    assert poll_job(after, job_id, timeout=60)["status"] == "succeeded"

    # The promoted replica has no replica of its own yet: `connected` goes on accepting on it alone,
    # a number refuses until one is back; /readyz says which.
    now = requests.get(f"{after}/readyz", timeout=10).json()["redis"]["replication"]
    assert now["connected_replicas"] == 0 and "warning" in now
    next_one = submit(after, "after-failover.png")
    if policy == "connected":
        assert next_one.status_code == 202, next_one.text
        assert poll_job(after, next_one.json()["id"], timeout=60)["status"] == "succeeded"
    else:
        assert next_one.status_code == 503 and next_one.json()["error"]["code"] == "redis_unreplicated"


def test_a_retry_during_the_first_requests_confirmation_is_never_answered_with_a_job_that_is_then_removed(
        stack, pair):
    """A client whose first request is slow (its replicas have not confirmed yet) retries with the same
    Idempotency-Key. Answering the retry at once with the job would hand out an id that the first
    request removes a moment later, when its confirmation runs out: the retry waits for its own."""
    import threading

    primary, link, _ = pair
    stack.env.update(REDIS_URL=primary.url, GNOSIS_ACCEPT_REPLICAS="1", GNOSIS_ACCEPT_REPLICAS_WAIT="2")
    url = stack.api()
    document = text_image(["retried while unconfirmed"])
    headers = {"Idempotency-Key": "order-5150"}

    def post() -> requests.Response:
        return requests.post(f"{url}/v1/jobs", files={"file": ("a.png", document)}, headers=headers, timeout=15)

    link.hold()
    answers: list[requests.Response] = []
    first = threading.Thread(target=lambda: answers.append(post()))
    first.start()
    on_primary = redis.Redis(port=primary.port)
    wait_until(lambda: on_primary.zcard(keys.LIVE_JOBS) == 1, timeout=10, message="the first request's job")
    answers.append(post())  # the retry, while the first request waits for its replica
    first.join(timeout=15)
    assert sorted(a.status_code for a in answers) == [503, 503], [a.text for a in answers]
    assert all(a.json()["error"]["code"] == "redis_unreplicated" for a in answers)
    assert on_primary.zcard(keys.LIVE_JOBS) == 0  # nothing accepted, so nothing kept

    link.release()
    accepted = post()  # the client's next retry, once the replica keeps up
    assert accepted.status_code == 202, accepted.text
    assert requests.get(f"{url}/v1/jobs/{accepted.json()['id']}", timeout=10).status_code == 200


def test_a_job_whose_ending_a_failover_lost_runs_again_and_finds_its_document(stack, pair, tmp_path):
    """With documents in a shared directory, the worker deleted a job's document as it ended the job. A
    failover that loses the ending (the replica had not received it yet) runs the page again, which then
    failed with `input_missing`: the document must outlive the ending until no failover can undo it."""
    primary, link, replica = pair
    stack.env.update(REDIS_URL=primary.url, GNOSIS_INPUT_STORE=str(tmp_path / "inputs"))
    url = stack.api()
    job = submit(url, "ended.png")
    assert job.status_code == 202, job.text
    assert replication.confirm(redis.Redis(port=primary.port), 1, 5.0) == 1  # the replica has job and page
    link.hold()
    worker = stack.worker(OCR_ENGINE="null")
    assert poll_job(url, job.json()["id"], timeout=60)["status"] == "succeeded"  # on the primary alone
    worker.stop()
    fail_over(primary, link, replica)

    stack.env["REDIS_URL"] = replica.url
    after = stack.api()
    stack.worker(OCR_ENGINE="null", GNOSIS_CACHE_VISIBILITY_WAIT="1")
    final = poll_job(after, job.json()["id"], timeout=60)
    assert final["status"] == "succeeded", final


def test_with_accept_replicas_a_cancel_or_deletion_no_replica_confirms_is_answered_503_until_one_does(stack, pair):
    """A cancel lost with the primary let its job (or batch) run on and succeed; a deletion lost with it
    brought the job and its document back. A 200 or 204 (or the 404 of a deletion sent again) comes only once a replica
    has it; until then 503, and sending it again is safe."""
    primary, link, replica = pair
    stack.env.update(REDIS_URL=primary.url, GNOSIS_ACCEPT_REPLICAS="1", GNOSIS_ACCEPT_REPLICAS_WAIT="0.5")
    url = stack.api(GNOSIS_BATCH_BUCKETS="gs://in/,gs://out/")
    cancelled, deleted = (submit(url, name).json()["id"] for name in ("cancelled.png", "deleted.png"))  # queued
    batch = requests.post(f"{url}/v1/batches", json={"source": "gs://in/docs/", "destination": "gs://out/md/"},
                          timeout=10).json()["id"]  # never listed: no worker

    link.hold()
    answers = [requests.post(f"{url}/v1/jobs/{cancelled}/cancel", timeout=10),
               requests.post(f"{url}/v1/batches/{batch}/cancel", timeout=10),
               requests.delete(f"{url}/v1/jobs/{deleted}", timeout=10),
               requests.delete(f"{url}/v1/jobs/{deleted}", timeout=10)]  # the client's repeat
    for r in answers:
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unreplicated", r.text
        assert int(r.headers["Retry-After"]) > 0 and "Send it again" in r.json()["error"]["message"]

    link.release()
    again = requests.post(f"{url}/v1/jobs/{cancelled}/cancel", timeout=10)
    assert again.status_code == 200 and again.json()["status"] == "cancelled", again.text
    again = requests.post(f"{url}/v1/batches/{batch}/cancel", timeout=10)
    assert again.status_code == 200 and again.json()["status"] == "cancelled", again.text
    assert requests.delete(f"{url}/v1/jobs/{deleted}", timeout=10).status_code == 404  # gone, and confirmed
    counted = ('gnosis_submissions_unreplicated_total{kind="cancel"} 1.0',
               'gnosis_submissions_unreplicated_total{kind="batch_cancel"} 1.0',
               'gnosis_submissions_unreplicated_total{kind="delete"} 2.0')
    wait_until(lambda: all(line in requests.get(f"{url}/metrics", timeout=10).text for line in counted), timeout=15,
               message="the 503s to be counted")

    fail_over(primary, link, replica)  # at once: what was answered must be on the replica already
    stack.env["REDIS_URL"] = replica.url
    after = stack.api()
    assert requests.get(f"{after}/v1/jobs/{cancelled}", timeout=10).json()["status"] == "cancelled"
    assert requests.get(f"{after}/v1/jobs/{deleted}", timeout=10).status_code == 404
    assert requests.get(f"{after}/v1/batches/{batch}", timeout=10).json()["status"] == "cancelled"


def test_the_client_deletes_through_503s_while_replicas_catch_up_and_takes_the_404_of_its_repeat_for_done(
        stack, pair):
    import threading

    from gnosis_ocr.client import Client

    primary, link, _ = pair
    stack.env.update(REDIS_URL=primary.url, GNOSIS_ACCEPT_REPLICAS="1", GNOSIS_ACCEPT_REPLICAS_WAIT="0.5")
    url = stack.api()
    job_id = submit(url, "deleted.png").json()["id"]
    link.hold()
    errors: list[BaseException] = []

    def delete() -> None:
        try:
            Client(url, retries=10, backoff=0.2).delete(job_id)
        except BaseException as exc:
            errors.append(exc)

    deleting = threading.Thread(target=delete)
    deleting.start()
    wait_until(lambda: 'gnosis_submissions_unreplicated_total{kind="delete"}' in
               requests.get(f"{url}/metrics", timeout=10).text, timeout=15, message="a 503 to the deletion")
    link.release()
    deleting.join(timeout=60)
    assert not deleting.is_alive() and errors == []
    assert requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).status_code == 404
