"""GNOSIS_ACCEPT_REPLICAS: a 202 means the job is on a replica, so losing the primary the next moment
loses nothing; a job no replica confirms is refused (503) and kept nowhere.

The replica follows its primary through a proxy that can hold the replication stream back: the
replica falls behind while the primary goes on taking writes, as a slow link or a busy replica would.
Then the primary dies and the replica is promoted, as Sentinel or Memorystore's failover would do.
"""

from __future__ import annotations

import signal

import pytest
import redis
import requests

from gnosis_ocr import keys, replication
from gnosis_ocr.worker import reconcile, registry
from harness.docs import pdf_of_pages, text_image
from harness.redisproc import PrivateRedis
from harness.stack import poll_job, wait_until
from tests.integration.test_batches import batch_now, final, result_objects, start_batch, upload_pages
from tests.redisproxy import HoldingProxy, MovingProxy


@pytest.fixture
def pair(tmp_path):
    primary = PrivateRedis(tmp_path / "primary").start()
    link = HoldingProxy(primary.port)
    replica = PrivateRedis(tmp_path / "replica").start(extra=["--replicaof", "127.0.0.1", str(link.port)])
    admin = redis.Redis(port=replica.port)
    wait_until(lambda: admin.info("replication").get("master_link_status") == "up", timeout=15,
               message="the replica to sync")
    yield primary, link, replica
    link.cut()
    primary.stop()
    replica.stop()


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


def test_a_page_whose_ending_a_failover_lost_runs_again_while_its_worker_lives_on(stack, pair):
    """The promoted replica had a page's claim but not its ending: the worker's in-flight entry and the
    page's unacknowledged message, while the worker, alive and reconnected through an endpoint that follows
    the primary, had finished that delivery long before. The reconciler took the entry for a page still
    running, and the job waited out the broker's visibility timeout (13 minutes by default) before it ran
    again. A worker now drops the entries no delivery of its own holds."""
    primary, link, replica = pair
    endpoint = MovingProxy(primary.url)
    # Beats every 2 s: the worker's record outlives the failover, so no reaper takes the page for a dead
    # worker's; the reconciler passes every 12 s.
    stack.env.update(REDIS_URL=endpoint.url, GNOSIS_RECONCILE_GRACE="2", GNOSIS_HEARTBEAT_INTERVAL="2")
    url = stack.api()
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="3")
    job = submit(url, "claimed.png")
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    old = redis.Redis(port=primary.port)
    wait_until(lambda: in_flight(old) == [f"{job_id}:0"], timeout=60, message="the page to be claimed")
    assert replication.confirm(old, 1, 5.0) == 1  # the replica has the claim
    link.hold()
    assert poll_job(url, job_id, timeout=60)["status"] == "succeeded"  # on the primary alone
    # Acknowledged there too: an acknowledgement the failover cut short is restored by the worker itself.
    wait_until(lambda: old.hlen(reconcile.UNACKED_KEY) == 0, timeout=30, message="the page's acknowledgement")
    fail_over(primary, link, replica)
    endpoint.move_to(replica.port)

    new = redis.Redis(port=replica.port)
    assert new.hget(keys.job(job_id), "status") == b"running" and in_flight(new) == [f"{job_id}:0"]
    final = poll_job(url, job_id, timeout=120)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2  # the claim the replica had, and the delivery that ran the page again
    assert in_flight(new) == []


def in_flight(client: redis.Redis) -> list[str]:
    """Every worker's in-flight entries (job:page)."""
    return sorted(field.decode() for key in client.scan_iter(keys.WORKER_INFLIGHTS) for field in client.hkeys(key))


def test_a_worker_drops_only_its_in_flight_entries_that_no_delivery_it_holds_wrote(redis_url, monkeypatch):
    monkeypatch.setenv("GNOSIS_WORKER_ID", "gnosis-1@host-test")
    client = redis.Redis.from_url(redis_url)
    key = keys.worker_inflight(registry.worker_id())
    for name, tag in (("running", "t1"), ("over", "t2"), ("untagged", None), ("again", "t3")):
        client.hset(key, *registry.entry(name, 0, tag)[1:])

    def held() -> set[str]:  # asked after the entries were read; meanwhile a new delivery claims "again"
        client.hset(key, *registry.entry("again", 0, "t4")[1:])
        return {"t1", "t4"}

    assert registry.prune(client, held) == ["over:0"]
    assert sorted(f.decode() for f in client.hkeys(key)) == ["again:0", "running:0", "untagged:0"]
    assert registry.prune(client, lambda: {"t1", "t4"}) == []


@pytest.mark.parametrize("seed", [1, 2])
def test_a_failover_to_a_lagging_replica_at_any_moment_stalls_none_of_the_jobs_it_had(stack, pair, seed):
    """Pages claimed, recorded and acknowledged on the primary alone, cut at a moment drawn from `seed`:
    the promoted replica has some of each, in every mix. Every job it had must still end `succeeded`,
    with each page's text, well within the broker's visibility timeout."""
    import random

    draw = random.Random(seed)
    primary, link, replica = pair
    endpoint = MovingProxy(primary.url)
    stack.env.update(REDIS_URL=endpoint.url, GNOSIS_RECONCILE_GRACE="2", GNOSIS_HEARTBEAT_INTERVAL="2",
                     GNOSIS_ACCEPT_REPLICAS="1")  # a 202 means the replica has the job
    url = stack.api()
    pages = [[f"job {n} page {p}" for p in range(1 + n % 3)] for n in range(10)]
    jobs = []
    for n, texts in enumerate(pages):
        r = requests.post(f"{url}/v1/jobs", files={"file": (f"{n}.pdf", pdf_of_pages([[t] for t in texts]))},
                          timeout=10)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["id"])
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.3", concurrency=2)
    old = redis.Redis(port=primary.port)

    def recorded() -> int:
        return sum(int(old.hget(keys.job(j), "pages_done") or 0) for j in jobs)

    held_at = draw.randrange(2, 8)  # pages recorded when the replica stops hearing
    wait_until(lambda: recorded() >= held_at, timeout=60, message="pages to be recorded")
    link.hold()
    alone = draw.randrange(1, 5)  # then these on the primary alone, with the claims and acknowledgements around
    wait_until(lambda: recorded() >= held_at + alone, timeout=60, message="pages on the primary alone")
    fail_over(primary, link, replica)
    endpoint.move_to(replica.port)

    finals = [poll_job(url, job_id, timeout=120) for job_id in jobs]
    assert [f for f in finals if f["status"] != "succeeded"] == []
    for job_id, texts in zip(jobs, pages, strict=True):
        result = requests.get(f"{url}/v1/jobs/{job_id}/result", timeout=10)
        assert result.status_code == 200 and len(result.json()["pages"]) == len(texts), result.text


def test_a_batch_through_a_failover_to_a_lagging_replica_ends_with_every_document_counted_once(stack, pair, bucket):
    """Documents recorded, counted and written to the bucket on the primary alone: the promoted replica
    runs their pages again, and the batch still ends with each document once and every result written."""
    primary, link, replica = pair
    scans, host = bucket
    upload_pages(scans, 12, "doc", "Failover page")
    endpoint = MovingProxy(primary.url)
    stack.env.update(REDIS_URL=endpoint.url, GNOSIS_RECONCILE_GRACE="2", GNOSIS_HEARTBEAT_INTERVAL="2",
                     STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/")
    url = stack.api()
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.3", concurrency=2)
    batch = start_batch(url)
    old = redis.Redis(port=primary.port)
    wait_until(lambda: batch_now(url, batch["id"])["documents_done"] >= 3, timeout=60, message="documents done")
    assert replication.confirm(old, 1, 5.0) == 1
    link.hold()
    wait_until(lambda: batch_now(url, batch["id"])["documents_done"] >= 6, timeout=60,
               message="documents done on the primary alone")
    fail_over(primary, link, replica)
    endpoint.move_to(replica.port)

    done = final(url, batch["id"])
    assert (done["status"], done["documents_total"], done["documents_done"], done["documents_failed"]) == \
        ("succeeded", 12, 12, 0), done
    assert len(result_objects(scans, ".json")) == 12
