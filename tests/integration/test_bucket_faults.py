"""A batch while its bucket fails: a proxy in front of the GCS emulator answers 503 (what GCS answers
while overloaded) to the listing, the page reads or the result writes, for longer than the storage
client's retries (GNOSIS_BUCKET_TIMEOUT, 1 s here) and longer than a page's attempts allow. Nothing may
fail for that, nothing may be counted twice, and everything finishes once the bucket answers. A 403
(refused for good) fails what it refuses at once, saying why."""

from __future__ import annotations

import re

import pytest
import requests

from gnosis_ocr import keys
from harness.docs import text_image
from harness.flakybucket import EVERYTHING, WRITES, FlakyBucket
from harness.stack import wait_until
from tests.integration.test_batch_faults import light_worker, make_bucket
from tests.integration.test_batches import batch_now, final, result_objects, start_batch

pytestmark = pytest.mark.slow

NAMES = ("a-memo.png", "b-invoice.png", "c-receipt.png")


@pytest.fixture
def flaky(emulator, request):
    """The emulator's bucket `scans` with documents under in/ (NAMES, or those a test names with
    indirect parametrisation), and the proxy the stack talks to."""
    client, host = emulator
    scans = make_bucket(client)
    for name in getattr(request, "param", NAMES):
        scans.blob(f"in/{name}").upload_from_string(text_image([f"Scanned {name.split('-')[0]}"]))
    proxy = FlakyBucket(host)
    try:
        yield scans, proxy
    finally:
        proxy.stop()


def bucket_failures(url: str) -> dict[str, float]:
    """gnosis_bucket_failures_total by operation, from the API's /metrics."""
    metrics = requests.get(f"{url}/metrics").text
    found = re.findall(r'^gnosis_bucket_failures_total\{operation="(\w+)"\} (\S+)$', metrics, re.MULTILINE)
    return {operation: float(value) for operation, value in found}


def bucket_env(stack, proxy: FlakyBucket, **env: str) -> None:
    stack.env.update({"STORAGE_EMULATOR_HOST": proxy.url, "GOOGLE_CLOUD_PROJECT": "test",
                      "GNOSIS_BATCH_BUCKETS": "gs://scans/", "GNOSIS_BUCKET_TIMEOUT": "1", **env})


def listed_then_reads_fail(stack, url: str, proxy: FlakyBucket, documents: int) -> dict:
    """A batch started and its jobs made; from then on the bucket refuses the documents' reads (not the
    results' writes)."""
    light_worker(stack)
    batch = start_batch(url)
    wait_until(lambda: stack.redis.scard(keys.batch_jobs(batch["id"])) == documents, timeout=60,
               message="every document's job to be made")
    proxy.refuse(lambda method, path: "/o/in%2F" in path)
    return batch


def test_a_bucket_down_during_the_listing_and_the_pages_fails_nothing_and_spends_no_attempt(stack, flaky):
    scans, proxy = flaky
    bucket_env(stack, proxy, GNOSIS_PAGE_MAX_ATTEMPTS="2")
    url = stack.api()
    proxy.refuse(EVERYTHING)
    lister = light_worker(stack)
    batch = start_batch(url)
    wait_until(lambda: "returning the listing to the queue" in lister.log(), timeout=60,
               message="the listing to meet the failing bucket")
    assert batch_now(url, batch["id"])["status"] in ("queued", "running")
    proxy.refuse(None)
    wait_until(lambda: stack.redis.scard(keys.batch_jobs(batch["id"])) == len(NAMES), timeout=60,
               message="every document's job to be made once the bucket answers")
    proxy.refuse(EVERYTHING)  # down again before any page is read
    worker = stack.worker(OCR_ENGINE="null", concurrency=2)
    # Three pages, two attempts each: past six refused reads, some page was returned more often than its
    # attempts allow, and it must not have failed for it.
    returned = re.compile(r"could not read gs://scans/in/\S+ for now: .*; returning the page to the queue")
    wait_until(lambda: len(returned.findall(worker.log())) > 2 * len(NAMES)
               or batch_now(url, batch["id"])["documents_failed"], timeout=90,
               message="the pages to be returned to the queue more often than their attempts allow")
    assert batch_now(url, batch["id"])["documents_failed"] == 0, "a page failed for an outage of its bucket"
    proxy.refuse(None)
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_total"], done["documents_done"], done["documents_failed"]) == \
        ("succeeded", len(NAMES), len(NAMES), 0), done
    # A page the bucket kept from running was delivered again and again, yet ran once.
    for job_id in stack.redis.smembers(keys.batch_jobs(batch["id"])):
        job = requests.get(f"{url}/v1/jobs/{job_id.decode()}").json()
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
    assert result_objects(scans, ".json") == sorted(f"out/{name}.json" for name in NAMES)
    # What an operator sees of the outage: failed listings and reads, no failed document.
    counted = wait_until(lambda: (c := bucket_failures(url)).get("read", 0) > 2 * len(NAMES) and c, timeout=10,
                         message="the failed reads to be counted")
    # (And writes: the batch's mark, tried at each listing's start until it is written.)
    assert counted.get("list", 0) >= 1, counted


def test_results_the_destination_refuses_for_now_are_written_once_it_answers(stack, flaky):
    scans, proxy = flaky
    bucket_env(stack, proxy, GNOSIS_RECONCILE_GRACE="10")
    url = stack.api()
    proxy.refuse(WRITES)
    light_worker(stack)
    worker = stack.worker(OCR_ENGINE="null", concurrency=1)
    batch = start_batch(url)
    wait_until(lambda: len(jobs := stack.redis.smembers(keys.batch_jobs(batch["id"]))) == len(NAMES) and all(
        requests.get(f"{url}/v1/jobs/{j.decode()}").json()["status"] == "succeeded" for j in jobs), timeout=90,
        message="every document's job to succeed")
    # One write met the failing bucket; the next jobs' threads did not wait on it too (on a GPU worker,
    # every page thread would otherwise sit in the storage client's retries while the GPU idles).
    log = worker.log()
    assert len(re.findall(r"could not write the result of \S+ for now", log)) == 1, log
    assert len(re.findall(r"the result of \S+ is left for the housekeeper", log)) == len(NAMES) - 1, log
    # The housekeeper tries again while the bucket still refuses: still owed, never failed.
    tried = len(proxy.refused)
    wait_until(lambda: len(proxy.refused) > tried, timeout=60, message="the housekeeper to try a write again")
    now = batch_now(url, batch["id"])
    assert now["status"] in ("queued", "running") and (now["documents_done"], now["documents_failed"]) == (0, 0), now
    proxy.refuse(None)
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_done"], done["documents_failed"]) == ("succeeded", len(NAMES), 0), done
    assert result_objects(scans) == sorted(f"out/{name}{ext}" for name in NAMES for ext in (".json", ".md"))
    # The page thread's write, at least (the housekeeper's may have got through on a retry, once let through).
    wait_until(lambda: bucket_failures(url).get("write", 0) >= 1, timeout=10, message="the failed write to be counted")


def test_a_destination_that_keeps_failing_fails_each_document_named_before_its_text_expires(stack, flaky):
    _, proxy = flaky
    # The housekeeper gives up on a write after half the retention (10 s of 20 s).
    bucket_env(stack, proxy, GNOSIS_RECONCILE_GRACE="1", GNOSIS_JOB_TTL="20")
    url = stack.api()
    proxy.refuse(WRITES)
    light_worker(stack)
    stack.worker(OCR_ENGINE="null", concurrency=2)
    batch = start_batch(url)
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_done"], done["documents_failed"]) == ("succeeded", 0, len(NAMES)), done
    failed = requests.get(f"{url}/v1/batches/{batch['id']}/documents", params={"status": "failed"}).json()
    assert sorted((d["name"], d["code"]) for d in failed["documents"]) == \
        sorted((name, "destination_unwritable") for name in NAMES), failed
    assert all("503" in d["message"] for d in failed["documents"]), failed


def test_a_source_that_keeps_failing_fails_each_document_named_and_the_batch_ends(stack, flaky):
    _, proxy = flaky
    # Reads are given up on after as long as writes are: half the retention (10 s of 20 s) since the
    # page's bucket first failed it, however often it was handed back in between.
    bucket_env(stack, proxy, GNOSIS_JOB_TTL="20")
    url = stack.api()
    batch = listed_then_reads_fail(stack, url, proxy, len(NAMES))
    worker = stack.worker(OCR_ENGINE="null", concurrency=2)
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_done"], done["documents_failed"]) == ("succeeded", 0, len(NAMES)), done
    failed = requests.get(f"{url}/v1/batches/{batch['id']}/documents", params={"status": "failed"}).json()
    assert sorted((d["name"], d["code"]) for d in failed["documents"]) == \
        sorted((name, "source_unreadable") for name in NAMES), failed
    assert all("gs://scans failed every read of this document for" in d["message"] for d in failed["documents"])
    assert worker.log().count("returning the page to the queue, behind the others") >= len(NAMES), \
        "each page was handed back before it failed"


def test_a_destination_the_service_may_not_write_to_fails_the_batch_before_any_page_runs(stack, flaky):
    _, proxy = flaky
    # The service account may read the source but not write the results: found out by the batch's mark,
    # before a single document is read, recognised and then failed.
    bucket_env(stack, proxy)
    url = stack.api()
    proxy.refuse(WRITES, status=403)
    light_worker(stack)
    batch = start_batch(url)
    done = final(url, batch["id"], stack)
    assert done["status"] == "failed" and done["error"]["code"] == "destination_unwritable", done
    assert "gs://scans/out/" in done["error"]["message"] and "403" in done["error"]["message"], done
    assert done["documents_total"] == 0 and not stack.redis.scard(keys.batch_jobs(batch["id"])), done
    assert not any("/o/in%2F" in path for _, path in proxy.seen), "a document was read"


def test_a_listing_run_again_reads_nothing_again_of_the_documents_it_dealt_with(stack, flaky):
    _, proxy = flaky
    bucket_env(stack, proxy)
    url = stack.api()
    proxy.refuse(lambda method, path: "c-receipt" in path)  # listed after the other two, in name order
    lister = light_worker(stack)
    batch = start_batch(url)
    interrupted = lambda runs: lister.log().count("; returning the listing to the queue") >= runs  # noqa: E731

    def first_two() -> int:
        return sum(1 for _, path in proxy.seen if "a-memo" in path or "b-invoice" in path)

    wait_until(lambda: interrupted(1), timeout=60, message="the listing to meet the failing document")
    after_first = first_two()
    assert after_first > 0
    wait_until(lambda: interrupted(3), timeout=60, message="the listing to run twice more")
    # A 10,000-document batch relisted after its 9,000th would otherwise read 9,000 documents again.
    assert first_two() == after_first, proxy.seen
    # Nor is the destination's mark written again (no page has run: the mark is the only write so far).
    assert sum(1 for _, path in proxy.seen if path.startswith("/upload/")) == 1, proxy.seen
    proxy.refuse(None)
    stack.worker(OCR_ENGINE="null")
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_total"], done["documents_done"]) == ("succeeded", len(NAMES),
                                                                                  len(NAMES)), done


def test_a_source_the_service_may_not_list_fails_the_batch_with_the_reason(stack, flaky):
    _, proxy = flaky
    bucket_env(stack, proxy)
    url = stack.api()
    proxy.refuse(lambda method, path: not path.startswith("/upload/"), status=403)  # may write, not list
    light_worker(stack)
    batch = start_batch(url)
    done = final(url, batch["id"], stack)
    assert done["status"] == "failed" and done["error"]["code"] == "source_unreadable", done
    assert "gs://scans/in/" in done["error"]["message"] and "403" in done["error"]["message"], done
    assert done["documents_total"] == 0, done


SCANS = tuple(f"{i:02d}-scan.png" for i in range(12))


@pytest.mark.parametrize("flaky", [SCANS], indirect=True)
def test_while_a_source_fails_one_page_thread_tries_it_and_an_upload_behind_its_pages_is_not_held_up(stack, flaky):
    _, proxy = flaky
    bucket_env(stack, proxy, GNOSIS_BUCKET_TIMEOUT="3")
    url = stack.api()
    batch = listed_then_reads_fail(stack, url, proxy, len(SCANS))
    upload = requests.post(f"{url}/v1/jobs", files={"file": ("memo.png", text_image(["Upload memo"]))})
    assert upload.status_code == 202, upload.text
    # A GPU worker's page threads, three here.
    worker = stack.spawn("worker", ["worker", "--pool=threads", "--concurrency=3"], OCR_ENGINE="null")
    stack.wait_worker_ready(worker)
    # The upload is queued behind the batch's first ten pages (a smaller backlog, a higher priority):
    # requeued as they were, pages of a bucket that fails for hours would come back ahead of it each time.
    job = wait_until(lambda: (j := requests.get(f"{url}/v1/jobs/{upload.json()['id']}").json())["status"]
                     in ("succeeded", "failed") and j, timeout=60, message="the upload to end")
    assert job["status"] == "succeeded", job
    # Each page ahead of the upload was taken and given back, but once the bucket had failed one thread
    # at a time called it, and the others gave their page back at once, without a call. Without that,
    # each of the ten pages ahead would have held a thread for GNOSIS_BUCKET_TIMEOUT before the upload
    # ran. (How many of each depends on how fast the threads cycle; breaker.py's tests pin the rule.)
    log = worker.log()
    reads = len(re.findall(r"could not read gs://scans/in/\S+ for now", log))
    skipped = log.count("failed a read for now and another page is trying it")
    assert 1 <= reads < 10 and skipped >= 1, (reads, skipped)
    assert batch_now(url, batch["id"])["documents_done"] == 0  # the source still fails
    proxy.refuse(None)
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_done"], done["documents_failed"]) == ("succeeded", len(SCANS), 0), done
