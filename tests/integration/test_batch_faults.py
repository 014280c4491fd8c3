"""A batch through faults between its listing and its pages: the listing's message lost or never sent,
Redis refusing the light worker mid-listing, the light worker stopped while its listing waits for room,
documents counted again, and a document replaced after its pages were counted, on buckets with and
without object versioning (fake-gcs-server's in-memory backend keeps older generations)."""

from __future__ import annotations

import pytest
import requests
from google.cloud import storage

from gnosis_ocr import keys
from gnosis_ocr.broker import cache_queue, queue_keys
from gnosis_ocr.settings import Settings
from harness.docs import text_image, words
from harness.redisproc import deny_job_keys
from harness.stack import wait_until
from tests.integration.test_batches import final, start_batch

pytestmark = pytest.mark.slow


def make_bucket(client: storage.Client, *, versioning: bool = False) -> storage.Bucket:
    bucket = client.bucket("scans")
    bucket.versioning_enabled = versioning
    return client.create_bucket(bucket)


def light_worker(stack, **env: str):
    """A light worker alone: it lists batches and counts their pages, and reads no page."""
    return stack.spawn("light", ["worker", "--light", "--concurrency=4"], **env)


@pytest.mark.parametrize("versioning", [True, False], ids=["versioned", "unversioned"])
def test_a_document_replaced_after_its_pages_were_counted_is_never_read_as_its_replacement(stack, emulator,
                                                                                           versioning):
    client, host = emulator
    scans = make_bucket(client, versioning=versioning)
    scans.blob("in/letter.png").upload_from_string(text_image(["Counted alpha"]))
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/")
    url = stack.api()
    light_worker(stack)
    batch = start_batch(url)
    wait_until(lambda: stack.redis.scard(keys.batch_jobs(batch["id"])) == 1, timeout=60,
               message="the document's pages to be counted and its job made")
    scans.blob("in/letter.png").upload_from_string(text_image(["Replacement bravo", "and a second line"]))
    stack.worker()
    done = final(url, batch["id"], stack)
    if versioning:
        # The generation that was counted is still in the bucket: it is what the result is of.
        assert (done["documents_done"], done["documents_failed"]) == (1, 0), done
        text = words(scans.blob("out/letter.png.md").download_as_bytes().decode())
        assert "alpha" in text and "bravo" not in text, text
    else:
        assert (done["documents_done"], done["documents_failed"]) == (0, 1), done
        failed = requests.get(f"{url}/v1/batches/{batch['id']}/documents", params={"status": "failed"}).json()
        [document] = failed["documents"]
        assert (document["name"], document["code"]) == ("letter.png", "input_missing"), document
        assert "replaced or deleted after the batch counted its pages" in document["message"], document


def test_a_listing_refused_by_redis_lists_again_when_redis_answers_and_counts_each_document_once(stack, emulator,
                                                                                                 acl_redis):
    admin, worker_url = acl_redis
    client, host = emulator
    scans = make_bucket(client)
    # Listed in name order: two that are not documents are counted as skipped before the first job is made.
    scans.blob("in/a-notes.txt").upload_from_string(b"not a document")
    scans.blob("in/b-table.csv").upload_from_string(b"a,b\n1,2\n")
    for name in ("c", "d"):
        scans.blob(f"in/{name}-scan.png").upload_from_string(text_image([f"Listed {name}"]))
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/")
    url = stack.api()
    deny_job_keys(admin, True)  # the light worker's job writes fail, as on an out-of-memory or read-only Redis
    lister = light_worker(stack, REDIS_URL=worker_url)
    batch = start_batch(url)
    wait_until(lambda: "returning the listing to the queue" in lister.log(), timeout=60,
               message="the listing to meet the refusal")
    assert requests.get(f"{url}/v1/batches/{batch['id']}").json()["status"] in ("queued", "running")
    deny_job_keys(admin, False)
    stack.worker(OCR_ENGINE="null")
    done = final(url, batch["id"], stack)
    # Listed more than once, yet each document counted once.
    assert (done["status"], done["documents_total"], done["documents_done"], done["documents_skipped"],
            done["documents_failed"]) == ("succeeded", 4, 2, 2, 0), done


def test_a_batch_whose_listing_message_was_lost_is_listed_all_the_same(stack, emulator):
    client, host = emulator
    scans = make_bucket(client)
    for name in ("a", "b"):
        scans.blob(f"in/{name}.png").upload_from_string(text_image([f"Relisted {name}"]))
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/",
                     GNOSIS_RECONCILE_GRACE="1")
    url = stack.api()
    batch = start_batch(url)  # no worker yet: the listing's message waits in the light workers' queue
    # What BRPOP followed by a refused unacked write leaves (or an API killed before its publish): no
    # message, no worker, and nothing else would ever list the batch.
    queued = [(key, raw) for key in queue_keys(cache_queue(Settings()))
              for raw in stack.redis.lrange(key, 0, -1) if batch["id"].encode() in raw]
    assert len(queued) == 1 and stack.redis.lrem(*queued[0][:1], 1, queued[0][1]) == 1
    stack.worker(OCR_ENGINE="null")
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_total"], done["documents_done"]) == ("succeeded", 2, 2), done
    assert any("published the listing of 1 batch(es) again" in proc.log() for proc in stack.procs)
    assert not stack.redis.zcard(keys.BATCHES_UNLISTED)


def test_a_batch_whose_listing_cannot_be_sent_is_refused_and_leaves_nothing(stack, emulator, acl_redis):
    admin, api_url = acl_redis
    client, host = emulator
    make_bucket(client)
    # The API's user may write batches, but not into the light workers' queue (a publish that fails).
    admin.acl_setuser("worker", enabled=True, reset_keys=True, keys=["gnosis:*", "_kombu.*", "unacked*"])
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/")
    url = stack.api(REDIS_URL=api_url)
    r = requests.post(f"{url}/v1/batches", json={"source": "gs://scans/in/", "destination": "gs://scans/out/"})
    assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    # Told 503, the client may send it again: the refused batch must not also run later.
    assert not list(admin.scan_iter(keys.batch("*"))) and not admin.zcard(keys.BATCHES_UNLISTED)


def test_a_document_is_counted_once_and_only_by_its_own_batch(redis_url):
    import redis as redis_client

    from gnosis_ocr.batch import BatchStore

    batches = BatchStore(redis_client.Redis.from_url(redis_url), ttl=60)
    batch = batches.create(source="gs://scans/in/", destination="gs://scans/out/", owner="", overwrite=False,
                           callback_url="", options="")
    first = batches.end_document(batch.id, "skipped", name="notes.txt", listing=True)
    again = batches.end_document(batch.id, "skipped", name="notes.txt", listing=True)  # the listing ran again
    assert (first.counted, again.counted) == (True, False)  # the metric counts only the first
    # A job the listing made but never added to the batch (it failed in between and made another): its
    # end is not the batch's.
    batches.redis.zadd(keys.BATCH_ENDS, {"orphan-job": 1})
    assert not batches.end_document(batch.id, "done", job_id="orphan-job").counted
    now = batches.get(batch.id)
    assert (now.documents_total, now.documents_skipped, now.documents_done) == (1, 1, 0)
    assert not batches.redis.zscore(keys.BATCH_ENDS, "orphan-job")  # and the housekeeper will not count it either
    # Two listings of the batch at once (kombu puts a running listing's message back when its connection
    # drops) each make a job of one document: the document is the batch's once.
    assert batches.add_job(batch.id, "job-a", "scan.pdf") and not batches.add_job(batch.id, "job-b", "scan.pdf")
    assert (batches.get(batch.id).documents_total, batches.jobs(batch.id)) == (2, ["job-a"])


def test_a_listing_that_saw_more_documents_than_this_node_made_leaves_its_batch_unlisted(redis_url):
    """A listing cut by a failover ran partly on the old primary, and the documents it made there are not on
    the new one. Marked listed at its end, the batch ended as soon as the documents made here had (9 of 12 in
    CI); now the listing runs again instead."""
    import redis as redis_client

    from gnosis_ocr.batch import BatchStore

    batches = BatchStore(redis_client.Redis.from_url(redis_url), ttl=60)
    batch = batches.create(source="gs://scans/in/", destination="gs://scans/out/", owner="", overwrite=False,
                           callback_url="", options="")
    batches.end_document(batch.id, "skipped", name="notes.txt", listing=True)
    assert batches.listed(batch.id, 2) is None  # it saw notes.txt and scan.pdf
    assert (batches.get(batch.id).listed, batches.get(batch.id).status) == (False, "queued")
    assert batches.redis.zscore(keys.BATCHES_UNLISTED, batch.id) is not None  # the housekeeper still sees it
    batches.end_document(batch.id, "failed", name="scan.pdf", listing=True, code="unreadable_document")
    settlement = batches.listed(batch.id, 2)  # the listing run again
    assert (settlement.status, settlement.ended_now, batches.get(batch.id).documents_total) == ("succeeded", True, 2)


def test_a_light_worker_told_to_stop_hands_back_a_listing_that_waits_for_room(stack, emulator):
    client, host = emulator
    scans = make_bucket(client)
    for n in range(6):
        scans.blob(f"in/page{n}.png").upload_from_string(text_image([f"Waiting page {n}"]))
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/",
                     GNOSIS_API_KEYS="batch-key", GNOSIS_MAX_KEY_PAGES="2")
    url = stack.api()
    lister = light_worker(stack)
    batch = start_batch(url, headers={"Authorization": "Bearer batch-key"})
    # No page worker: with two of its pages waiting, the listing waits for room, for as long as it takes.
    wait_until(lambda: stack.redis.scard(keys.batch_jobs(batch["id"])) == 2, timeout=60,
               message="the listing to wait under the key's bound")
    code = lister.sigterm(timeout=20)
    assert code == 0 and "returning the listing to the queue" in lister.log(), lister.log()[-3000:]
    stack.worker(OCR_ENGINE="null")  # with a light worker of its own, which lists the rest
    done = final(url, batch["id"], stack, headers={"Authorization": "Bearer batch-key"})
    assert (done["status"], done["documents_total"], done["documents_done"]) == ("succeeded", 6, 6), done
