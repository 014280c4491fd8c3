"""Batches bucket to bucket against a real GCS API emulator (fake-gcs-server): every document under a
prefix read by the workers themselves, results written beside each other under another prefix,
what is not a document skipped, what cannot be read failed and named, a resubmission skipping what
is done, and prefixes outside GNOSIS_BATCH_BUCKETS refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from harness.docs import noise_pdf, pdf_of_pages, text_image, words
from harness.stack import ROOT, wait_until

pytestmark = pytest.mark.slow


def documents() -> dict[str, bytes]:
    """The issue's 30: PDFs of one to three pages and images (one with no extension) under nested
    prefixes, two that are not documents whatever their names say, and one corrupt PDF."""
    docs = {f"in/letters/{n:02}.pdf": pdf_of_pages([[f"Batch letter {WORDS[n]}", f"page {p + 1} of it"]
                                                      for p in range(1 + n % 3)]) for n in range(8)}
    docs.update({f"in/{'deep/er/' if n % 2 else ''}scan{n:02}.{'jpg' if n % 3 else 'png'}":
                 text_image([f"Batch scan {WORDS[8 + n]}"], size=(700, 160), fmt="JPEG" if n % 3 else "PNG")
                 for n in range(18)})
    docs["in/deep/photo-without-extension"] = text_image(["Batch photo quebec"], size=(700, 160))
    docs["in/notes.txt"] = b"not a document, whatever its name says"
    docs["in/table.pdf.csv"] = b"a,b\n1,2\n"
    docs["in/broken.pdf"] = b"%PDF-1.4\nthis is no pdf at all"
    return docs


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
         "papa romeo sierra tango uniform victor whiskey xray yankee zulu").split() + ["amber", "basil"]
DOCUMENTS = documents()
READABLE = sorted(n for n in DOCUMENTS if not n.endswith((".txt", ".csv")) and "broken" not in n)


def batch_stack(stack, host: str) -> str:
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/")
    url = stack.api()
    stack.worker(concurrency=2)
    return url


def upload_pages(scans, n: int, name: str, text: str) -> None:
    """n one-page PNGs under in/, each with its number in its text."""
    for i in range(n):
        scans.blob(f"in/{name}{i:02}.png").upload_from_string(text_image([f"{text} {i}"]))


def result_objects(bucket, ext: str = "") -> list[str]:
    """The names of the result objects under out/ ending in `ext`: not the batch's mark."""
    return sorted(b.name for b in bucket.list_blobs(prefix="out/")
                  if b.name.endswith(ext) and not b.name.endswith("/_gnosis_batch.json"))


def start_batch(url: str, **kwargs) -> dict:
    r = requests.post(f"{url}/v1/batches", json={"source": "gs://scans/in/", "destination": "gs://scans/out/"},
                      **kwargs)
    assert r.status_code == 202, r.text
    return r.json()


def batch_now(url: str, batch_id: str, headers: dict | None = None) -> dict:
    r = requests.get(f"{url}/v1/batches/{batch_id}", headers=headers)
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def final(url: str, batch_id: str, stack=None, headers: dict | None = None) -> dict:
    try:
        return wait_until(lambda: (b := batch_now(url, batch_id, headers))["status"]
                          in ("succeeded", "failed", "cancelled") and b, timeout=120, message="the batch to end")
    except AssertionError:
        if stack is not None:  # what the batch and its jobs were stuck at
            jobs = [j.decode() for j in stack.redis.smembers(f"gnosis:batch:{batch_id}:jobs")]
            states = {j: requests.get(f"{url}/v1/jobs/{j}", headers=headers).json().get("status") for j in jobs}
            raise AssertionError((requests.get(f"{url}/v1/batches/{batch_id}", headers=headers).json(), states,
                                  stack.redis.hgetall(f"gnosis:batch:{batch_id}"))) from None
        raise


def test_a_batch_reads_every_document_and_writes_each_result_beside_the_others(stack, bucket):
    from gnosis_ocr import webhook
    from tests.integration.test_webhooks import SECRET, Receiver, hooks_env

    scans, host = bucket
    for name, data in DOCUMENTS.items():
        scans.blob(name).upload_from_string(data)
    receiver = Receiver()
    hooks_env(stack)
    url = batch_stack(stack, host)
    r = requests.post(f"{url}/v1/batches", json={"source": "gs://scans/in/", "destination": "gs://scans/out/",
                                                 "callback_url": receiver.url})
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/v1/batches/{r.json()['id']}"
    batch = final(url, r.json()["id"])
    assert (batch["status"], batch["documents_total"], batch["documents_done"], batch["documents_failed"],
            batch["documents_skipped"]) == ("succeeded", 30, 27, 1, 2), batch
    # One signed webhook when the batch is final, with its counts.
    wait_until(lambda: receiver.calls, timeout=30, message="the batch's webhook")
    headers, body = receiver.calls[0]
    receiver.stop()
    assert headers["X-Gnosis-Event"] == "batch.succeeded"
    assert webhook.verify(SECRET, headers["X-Gnosis-Signature"], body)
    assert json.loads(body)["documents_done"] == 27 and len(receiver.calls) == 1
    # Owed from the count that ended the batch, settled by the delivery (worker/outbox.py).
    wait_until(lambda: not stack.redis.zcard("gnosis:webhooks:batch-outbox"), timeout=30, message="the outbox")
    metrics = wait_until(lambda: 'gnosis_batch_documents_total{outcome="done"} 27.0'
                         in (t := requests.get(f"{url}/metrics").text) and t, timeout=10, message="the counts")
    assert 'gnosis_batch_documents_total{outcome="skipped"} 2.0' in metrics
    failed = requests.get(f"{url}/v1/batches/{batch['id']}/documents", params={"status": "failed"}).json()
    assert [(d["name"], d["code"]) for d in failed["documents"]] == [("broken.pdf", "unreadable_document")]

    letter = json.loads(scans.blob("out/letters/02.pdf.json").download_as_bytes())
    assert [p["page"] for p in letter["pages"]] == [1, 2, 3] and {"charlie", "page"} <= words(letter["text"])
    assert "november" in words(scans.blob("out/deep/er/scan05.jpg.md").download_as_bytes().decode())
    assert "quebec" in words(scans.blob("out/deep/photo-without-extension.md").download_as_bytes().decode())
    written = sorted(b.name for b in scans.list_blobs(prefix="out/"))
    assert written == sorted([f"out/{n[3:]}{ext}" for n in READABLE for ext in (".json", ".md")] +
                             ["out/_gnosis_batch.json"])
    # Written before the listing, to learn that results may be written there: which batch writes there.
    mark = json.loads(scans.blob("out/_gnosis_batch.json").download_as_bytes())
    assert (mark["batch"], mark["source"], mark["destination"]) == (batch["id"], "gs://scans/in/", "gs://scans/out/")
    # No document passed through Redis: the workers read each from the bucket.
    assert not [k for k in stack.redis.scan_iter("gnosis:job:*:input")]

    # Again, from the command line: what is done is skipped, the broken one is named, and it exits 1.
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "batch", "gs://scans/in/", "gs://scans/out/",
                        "--wait", "--url", url, "--timeout", "120"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    rerun = json.loads(r.stdout.strip().splitlines()[-1])
    assert (rerun["documents_done"], rerun["documents_skipped"], rerun["documents_failed"]) == (0, 29, 1), rerun
    assert "broken.pdf: unreadable_document" in r.stderr and "30/30 documents (1 failed, 29 skipped)" in r.stderr


def test_batches_stay_inside_the_allowed_prefixes(stack, bucket):
    _, host = bucket
    url = batch_stack(stack, host)
    for body, status, code in (
            ({"source": "gs://other/in/", "destination": "gs://scans/out/"}, 403, "forbidden_source"),
            ({"source": "gs://scans/in/", "destination": "gs://elsewhere/out/"}, 403, "forbidden_source"),
            ({"source": "gs://scans/in/../x/", "destination": "gs://scans/out/"}, 400, "invalid_parameter"),
            ({"source": "gs://scans/in/", "destination": "gs://scans/in/out/"}, 400, "invalid_parameter"),
            ({"source": "/etc/", "destination": "gs://scans/out/"}, 400, "invalid_parameter"),
            ({"source": "gs://scans/in/", "destination": "gs://scans/out/", "pages": "x"}, 400, "invalid_parameter")):
        r = requests.post(f"{url}/v1/batches", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    closed = stack.api(GNOSIS_BATCH_BUCKETS="")
    r = requests.post(f"{closed}/v1/batches", json={"source": "gs://scans/in/", "destination": "gs://scans/out/"})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "batches_disabled")


def test_a_batch_sent_again_with_its_idempotency_key_is_the_same_batch_and_lists_its_documents_once(stack,
                                                                                                      bucket):
    """A client whose answer was lost sends the batch again: without a key that was a second batch
    reading every document again (the first one's results did not exist yet to be skipped)."""
    from gnosis_ocr.client import Client

    scans, host = bucket
    upload_pages(scans, 6, "page", "Idempotent batch page")
    url = batch_stack(stack, host)
    body = {"source": "gs://scans/in/", "destination": "gs://scans/out/"}
    first = requests.post(f"{url}/v1/batches", json=body, headers={"Idempotency-Key": "nightly-2026-12-06"})
    again = requests.post(f"{url}/v1/batches", json=body, headers={"Idempotency-Key": "nightly-2026-12-06"})
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["Location"] == first.headers["Location"]
    other = requests.post(f"{url}/v1/batches", json={**body, "overwrite": True},
                          headers={"Idempotency-Key": "nightly-2026-12-06"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    # A job's key and a batch's never answer for each other.
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["a job"]))},
                        headers={"Idempotency-Key": "nightly-2026-12-06"})
    assert job.status_code == 202, job.text
    client = Client(url)  # the client sends one key for all its tries
    made = client.submit_batch("gs://scans/in/", "gs://scans/out/", idempotency_key="nightly-2026-12-06")
    assert made["id"] == first.json()["id"]
    batch = final(url, first.json()["id"], stack)
    assert (batch["status"], batch["documents_total"], batch["documents_done"]) == ("succeeded", 6, 6), batch
    assert len(stack.redis.smembers(f"gnosis:batch:{batch['id']}:jobs")) == 6
    assert sorted(k.decode() for k in stack.redis.scan_iter("gnosis:batch:*") if k.count(b":") == 2) == \
        [f"gnosis:batch:{batch['id']}"]


def test_a_batch_keeps_to_its_idempotency_claim_and_stays_once_a_retry_has_answered_with_it(stack):
    """The store's side of the key: a batch is written only while the key holds this request's claim,
    and the first request's failure removes it only while no retry has answered with it."""
    from gnosis_ocr import keys
    from gnosis_ocr.batch import BatchStore
    from gnosis_ocr.job import ClaimLost

    store = BatchStore(stack.redis, ttl=3600)
    name = keys.batch_idempotency("", "retried")
    fields = {"source": "gs://scans/in/", "destination": "gs://scans/out/", "owner": "", "overwrite": False,
              "callback_url": "", "options": ""}
    stack.redis.set(name, f"{'b' * 32}:fp")  # a retry took the key over
    with pytest.raises(ClaimLost):
        store.create(**fields, batch_id="a" * 32, idem_name=name, idem_claim=f"{'a' * 32}:fp")
    assert store.get("a" * 32) is None
    store.create(**fields, batch_id="b" * 32, idem_name=name, idem_claim=f"{'b' * 32}:fp")
    assert store.vouch("b" * 32) and store.vouch("b" * 32)  # every retry may vouch
    assert store.abandon("b" * 32) is False and store.get("b" * 32) is not None
    stack.redis.set(name, f"{'c' * 32}:fp")
    store.create(**fields, batch_id="c" * 32, idem_name=name, idem_claim=f"{'c' * 32}:fp")
    assert store.abandon("c" * 32) is True and store.get("c" * 32) is None and stack.redis.get(name) is None
    assert store.vouch("c" * 32) is False


def test_a_cancelled_batch_stops_listing_and_its_jobs(stack, bucket):
    scans, host = bucket
    upload_pages(scans, 40, "page", "Cancelled batch page")
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/")
    url = stack.api()
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="1", concurrency=1)
    batch = start_batch(url)
    wait_until(lambda: requests.get(f"{url}/v1/batches/{batch['id']}").json()["documents_done"] >= 1, timeout=60,
               message="a first result")
    cancelled = requests.post(f"{url}/v1/batches/{batch['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    jobs = [j.decode() for j in stack.redis.smembers(f"gnosis:batch:{batch['id']}:jobs")]
    wait_until(lambda: all(requests.get(f"{url}/v1/jobs/{j}").json()["status"] in ("succeeded", "cancelled")
                           for j in jobs), timeout=30, message="its jobs to stop")
    assert any(requests.get(f"{url}/v1/jobs/{j}").json()["status"] == "cancelled" for j in jobs)
    assert 1 <= len(result_objects(scans, ".json")) < 40


def test_a_worker_killed_mid_batch_loses_no_document(stack, bucket):
    import signal

    scans, host = bucket
    upload_pages(scans, 12, "doc", "Survivor page")
    # A kill can land between a job's end and its count: the housekeeper counts it after this grace.
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/",
                     GNOSIS_RECONCILE_GRACE="2")
    url = stack.api()
    doomed = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="1", concurrency=2)
    batch = start_batch(url)
    wait_until(lambda: requests.get(f"{url}/v1/batches/{batch['id']}").json()["documents_done"] >= 2, timeout=60,
               message="the batch to be under way")
    doomed.kill_tree(signal.SIGKILL)  # pages in flight, the rest queued
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.2", concurrency=2)
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_total"], done["documents_done"], done["documents_failed"]) == \
        ("succeeded", 12, 12, 0), done
    assert len(result_objects(scans, ".json")) == 12


def test_a_worker_killed_between_a_documents_end_and_its_count_loses_nothing(stack, bucket, redis_url):
    import signal

    from gnosis_ocr import job_scripts
    from tests.redisproxy import ReplyLosingProxy

    scans, host = bucket
    scans.blob("in/only.png").upload_from_string(text_image(["Counted after all"]))
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/",
                     GNOSIS_RECONCILE_GRACE="2")
    url = stack.api()
    proxy = ReplyLosingProxy(redis_url)
    try:
        doomed = stack.worker(REDIS_URL=proxy.url)
        # The job is final in Redis; its worker dies before it writes the result or counts the document.
        proxy.lose_reply_to(job_scripts.FINISH_PAGE, then=lambda: doomed.kill_tree(signal.SIGKILL))
        batch = requests.post(f"{url}/v1/batches", json={"source": "gs://scans/in/",
                                                         "destination": "gs://scans/out/"}).json()
        assert proxy.lost.wait(60), "the page was never recorded"
        stack.worker()  # its housekeeper finds the document owed
        done = final(url, batch["id"], stack)
        assert (done["status"], done["documents_done"]) == ("succeeded", 1), done
        assert "counted" in words(scans.blob("out/only.png.md").download_as_bytes().decode())
    finally:
        proxy.stop()


def test_a_batch_waits_under_its_keys_page_bound_and_other_keys_go_first(stack, bucket):
    import threading

    scans, host = bucket
    upload_pages(scans, 10, "page", "Bounded batch page")
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/",
                     GNOSIS_API_KEYS="batch-key,small-key", GNOSIS_MAX_KEY_PAGES="3")
    url = stack.api()
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.5", concurrency=1)
    big, small = {"Authorization": "Bearer batch-key"}, {"Authorization": "Bearer small-key"}
    batch = start_batch(url, headers=big)
    owner = stack.redis.hget(f"gnosis:batch:{batch['id']}", "owner").decode()
    waiting, stop = [], threading.Event()

    def sample():  # the key's pages not yet done, as often as Redis answers
        while not stop.is_set():
            waiting.append(int(stack.redis.get(f"gnosis:owner:{owner}:pages") or 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        wait_until(lambda: requests.get(f"{url}/v1/batches/{batch['id']}", headers=big).json()["documents_done"]
                   >= 1, timeout=60, message="the batch's first result")
        mine = requests.post(f"{url}/v1/jobs", files={"file": ("small.png", text_image(["small key"]))},
                             headers=small)
        assert mine.status_code == 202, mine.text
        wait_until(lambda: requests.get(f"{url}/v1/jobs/{mine.json()['id']}", params={"wait": 5},
                                        headers=small).json()["status"] == "succeeded",
                   timeout=60, message="the other key's job")
        behind = requests.get(f"{url}/v1/batches/{batch['id']}", headers=big).json()
        done = wait_until(
            lambda: (b := requests.get(f"{url}/v1/batches/{batch['id']}", headers=big).json())["status"]
            in ("succeeded", "failed") and b, timeout=120, message="the batch to end")
    finally:
        stop.set()
        sampler.join(5)
    # The batch never had more pages waiting than its key may, yet all of it was done, and a job of
    # another key, sent mid-batch, did not wait for the rest of the batch.
    assert max(waiting) <= 3 and (done["status"], done["documents_done"]) == ("succeeded", 10), (max(waiting), done)
    assert behind["documents_done"] < 10, behind


def test_a_worker_told_to_stop_finishes_its_pages_and_another_finishes_the_batch(stack, bucket):
    scans, host = bucket
    upload_pages(scans, 12, "doc", "Drained page")
    stack.env.update(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT="test", GNOSIS_BATCH_BUCKETS="gs://scans/")
    url = stack.api()
    leaving = stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="1", concurrency=2)
    batch = start_batch(url)
    wait_until(lambda: requests.get(f"{url}/v1/batches/{batch['id']}").json()["documents_done"] >= 2, timeout=60,
               message="the batch to be under way")
    # What a scale-in sends: SIGTERM to the container's first process alone, then a grace period.
    code = leaving.sigterm(timeout=30)
    assert code == 0, leaving.log()[-3000:]  # it finished its pages and left
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.2", concurrency=2)
    done = final(url, batch["id"], stack)
    assert (done["status"], done["documents_done"], done["documents_failed"]) == ("succeeded", 12, 0), done
    jobs = [j.decode() for j in stack.redis.smembers(f"gnosis:batch:{batch['id']}:jobs")]
    # Every page ran once: the leaving worker finished what it had started and handed back what it had
    # only taken, so no page was cut off and run again.
    assert [int(stack.redis.hget(f"gnosis:job:{j}", "attempts")) for j in jobs] == [1] * 12
    assert len(result_objects(scans, ".json")) == 12


def count_ranged(name: str, *, ahead: bool = True):
    """The pages of gs://scans/`name` as a batch's listing counts them, and the reader it used."""
    from gnosis_ocr import document, gcs

    def inspect(stream):
        return document.inspect(stream, max_pages=100, max_pixels=10**8)

    with gcs.open_ranged("scans", name, max_bytes=10**9) as stream:
        return (stream.fetch_ahead(inspect) if ahead else inspect(stream)), stream


def test_counting_a_large_pdfs_pages_downloads_a_small_part_of_it(bucket, monkeypatch):
    from gnosis_ocr import document, gcs

    scans, _ = bucket
    data = noise_pdf(4, (2000, 2000))
    assert len(data) > gcs.WHOLE_BELOW, "the document must be large enough to be read by ranges"
    scans.blob("in/scan.pdf").upload_from_string(data)
    # pdfium has one lock per process: a download inside it would hold every other document's count up.
    held = []
    download = gcs.RangedReader._download
    monkeypatch.setattr(gcs.RangedReader, "_download",
                        lambda reader, index: held.append(document._PDFIUM_LOCK.locked()) or download(reader, index))
    for ahead in (True, False):
        held.clear()
        info, stream = count_ranged("in/scan.pdf", ahead=ahead)
        assert (info.kind, info.pages) == ("pdf", 4)
        assert stream.fetched < len(data) / 10, f"{stream.fetched} of {len(data)} bytes downloaded to count pages"
        assert any(held) is not ahead, held  # read ahead, no request is made under the lock
    # A small document is read in one request, whole, and inspected the same.
    scans.blob("in/letter.pdf").upload_from_string(small := pdf_of_pages([["one"], ["two"]]))
    with gcs.open_ranged("scans", "in/letter.pdf", max_bytes=10**9) as stream:
        assert document.inspect(stream, max_pages=100, max_pixels=10**8).pages == 2
    assert stream.fetched == len(small)


def test_a_large_pdf_read_ahead_is_refused_for_a_missing_page_and_counted_through_a_broken_xref(bucket):
    from gnosis_ocr.errors import UnreadableDocument

    scans, _ = bucket
    data = noise_pdf(4, (2000, 2000))
    # Its page tree claims a fifth page: refused as any upload is, once every block it needs is there.
    scans.blob("in/claims.pdf").upload_from_string(data.replace(b"/Count 4", b"/Count 5", 1))
    with pytest.raises(UnreadableDocument, match="says it has 5 pages but page 5 does not exist"):
        count_ranged("in/claims.pdf")
    # Its startxref points nowhere: pdfium rebuilds the cross-reference table by reading the whole file,
    # a block more each pass, so after a few passes the object is downloaded whole and counted.
    at = data.rindex(b"startxref")
    broken = data[:at] + b"startxref\n1\n%%EOF\n"
    scans.blob("in/broken.pdf").upload_from_string(broken)
    info, stream = count_ranged("in/broken.pdf")
    assert info.pages == 4 and stream.fetched >= len(broken)


def test_a_document_replaced_after_its_pages_were_counted_is_not_read_as_its_replacement(bucket):
    from google.api_core.exceptions import NotFound

    from gnosis_ocr import gcs

    scans, _ = bucket
    scans.blob("in/letter.pdf").upload_from_string(pdf_of_pages([["first"]]))
    with gcs.open_ranged("scans", "in/letter.pdf", max_bytes=10**9) as stream:
        counted = f"gs://scans/in/letter.pdf#{stream.generation}"  # what the job's page workers read
    assert gcs.read(counted, max_bytes=10**9) == scans.blob("in/letter.pdf").download_as_bytes()
    scans.blob("in/letter.pdf").upload_from_string(pdf_of_pages([["second"], ["third"]]))
    with pytest.raises(NotFound):
        gcs.read(counted, max_bytes=10**9)
