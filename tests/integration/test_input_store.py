"""Documents on the shared bucket (a directory every API and worker mounts), not in Redis."""

from __future__ import annotations

import os
import time

import pytest
import redis
import requests

from gnosis_ocr.inputstore import ORPHAN_GRACE, DirectoryInputs
from harness.docs import pdf_of_pages, text_image, words
from harness.stack import poll_job, wait_until

pytestmark = pytest.mark.slow


def stored(root) -> list[str]:
    return sorted(f for _, _, files in os.walk(root) for f in files if not f.startswith("."))


def input_path(stack, root, job_id: str):
    """Where a job's document lies: under the namespace of the deployment (its Redis)."""
    return root / stack.redis.get("gnosis:deployment").decode() / job_id[:2] / job_id


def test_documents_in_a_shared_directory_never_enter_redis(stack, tmp_path):
    root = tmp_path / "inputs"
    stack.env["GNOSIS_INPUT_STORE"] = str(root)
    url = stack.api()
    pdf = pdf_of_pages([[f"Bucket page {w}"] for w in ("one", "two", "three")])
    job = requests.post(f"{url}/v1/jobs", files={"file": ("b.pdf", pdf)}).json()
    assert stored(root) == [job["id"]]
    assert input_path(stack, root, job["id"]).read_bytes() == pdf
    assert not stack.redis.exists(f"gnosis:job:{job['id']}:input")

    stack.worker(GNOSIS_RECONCILE_GRACE="1")
    final = poll_job(url, job["id"], timeout=120)
    assert final["status"] == "succeeded", final
    text = requests.get(f"{url}/v1/jobs/{job['id']}/result").json()["text"]
    assert {"bucket", "page", "one", "two", "three"} <= set(words(text))
    # Deleted by the housekeeper once its job has been final for GNOSIS_RECONCILE_GRACE.
    wait_until(lambda: stored(root) == [], timeout=30, message="the input to be deleted after its job")


def test_cancelled_and_deleted_jobs_take_their_files_with_them(stack, tmp_path):
    root = tmp_path / "inputs"
    stack.env["GNOSIS_INPUT_STORE"] = str(root)
    url = stack.api()
    jobs = [requests.post(f"{url}/v1/jobs", files={"file": (f"{i}.png", text_image(["x"]))}).json() for i in range(2)]
    assert len(stored(root)) == 2
    requests.delete(f"{url}/v1/jobs/{jobs[1]['id']}")
    assert stored(root) == [jobs[0]["id"]]  # deleted at once, on the client's word
    requests.post(f"{url}/v1/jobs/{jobs[0]['id']}/cancel")
    assert stored(root) == [jobs[0]["id"]]  # kept until the cancellation is past any failover
    stack.worker(OCR_ENGINE="null", GNOSIS_RECONCILE_GRACE="1")
    wait_until(lambda: stored(root) == [], timeout=30, message="the housekeeper to delete the cancelled job's input")


def test_a_missing_input_fails_its_job_clearly(stack, tmp_path):
    root = tmp_path / "inputs"
    stack.env.update(GNOSIS_INPUT_STORE=str(root), GNOSIS_CACHE_VISIBILITY_WAIT="1")
    url = stack.api()
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["gone"]))}).json()
    os.unlink(input_path(stack, root, job["id"]))  # a bucket emptied by hand
    stack.worker()
    final = poll_job(url, job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "input_missing", final


def age(path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_files_whose_jobs_ended_are_swept(tmp_path):
    store = DirectoryInputs(str(tmp_path))
    for job_id in ("a" * 32, "b" * 32):
        store.put(job_id, b"doc")
        age(tmp_path / job_id[:2] / job_id, ORPHAN_GRACE + 1)
    store.put("c" * 32, b"new")  # too young to judge: its record may still be on its way
    assert store.sweep(lambda job_id: job_id == "a" * 32) == 1
    assert stored(tmp_path) == ["a" * 32, "c" * 32]


def test_deployments_sharing_one_directory_sweep_only_their_own_inputs(tmp_path, redis_url):
    """Staging and production on one bucket, each with its own Redis: production's sweep removes its
    own ended jobs' files and never staging's queued backlog, however old."""
    from gnosis_ocr.inputstore import ABANDONED_AFTER, from_setting
    from harness.redisproc import PrivateRedis

    staging_redis = PrivateRedis(tmp_path / "staging-redis", appendonly=False).start()
    try:
        prod = from_setting(str(tmp_path / "inputs"), redis.Redis.from_url(redis_url))
        staging = from_setting(str(tmp_path / "inputs"), redis.Redis.from_url(staging_redis.url))
        assert prod.namespace != staging.namespace
        for store, job_id in ((prod, "a" * 32), (prod, "b" * 32), (staging, "c" * 32)):
            store.put(job_id, b"doc")
            age(store._path(job_id), ORPHAN_GRACE + 1)
        # Production knows only its own jobs: "a" still runs, "b" ended; staging's "c" is unknown to it.
        assert prod.sweep(lambda job_id: job_id == "a" * 32) == 1
        assert prod.fetch("a" * 32) == b"doc" and prod.fetch("b" * 32) is None
        assert staging.fetch("c" * 32) == b"doc", "another deployment's queued document was deleted"
        assert staging.sweep(lambda job_id: True) == 0

        # A namespace nobody has marked alive for ABANDONED_AFTER (its deployment is gone) is removed.
        marker = tmp_path / "inputs" / staging.namespace / ".alive"
        age(marker, ABANDONED_AFTER + 1)
        assert prod.sweep(lambda job_id: True) == 1
        assert staging.fetch("c" * 32) is None and prod.fetch("a" * 32) == b"doc"
    finally:
        staging_redis.stop()


def test_a_document_queued_before_namespaces_is_still_read(tmp_path, redis_url):
    """Written by the release before namespaces (at the top of the directory), queued across the upgrade."""
    from gnosis_ocr.inputstore import from_setting

    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / ("d" * 32)).write_bytes(b"old")
    store = from_setting(str(tmp_path), redis.Redis.from_url(redis_url))
    assert store.fetch("d" * 32) == b"old"
    store.delete("d" * 32)
    assert store.fetch("d" * 32) is None


def db_bytes(client) -> int:
    """What this database's keys take (MEMORY USAGE of each): the server's own total counts the other
    databases too, which parallel test processes are using."""
    return sum(client.memory_usage(key, samples=0) or 0 for key in client.scan_iter(count=1000))


@pytest.mark.parametrize("where", ["redis", "directory"])
def test_redis_bytes_per_queued_100kb_job(stack, tmp_path, where):
    from tests.integration.test_greedy_clients import noise_png

    if where == "directory":
        stack.env["GNOSIS_INPUT_STORE"] = str(tmp_path / "inputs")
    url = stack.api()
    document = noise_png(100_000)
    before = db_bytes(stack.redis)
    for i in range(20):
        assert requests.post(f"{url}/v1/jobs", files={"file": (f"{i}.png", document)}).status_code == 202
    per_job = (db_bytes(stack.redis) - before) / 20
    print(f"\ninputs in {where}: {per_job / 1024:.1f} KiB of Redis memory per queued {len(document) // 1000} KB job")
    if where == "directory":
        assert per_job < 10 * 1024
    else:
        assert per_job > len(document)


def test_a_full_input_store_answers_503_with_retry_after(stack, tmp_path):
    import subprocess

    from tests.integration.test_redis_pressure import noisy_png

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(inputs)],
                      capture_output=True).returncode != 0:
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    try:
        stack.env["GNOSIS_INPUT_STORE"] = str(inputs)
        url = stack.api()
        answers = [requests.post(f"{url}/v1/jobs", files={"file": (f"{n}.png", noisy_png(n, 150_000))}, timeout=30)
                   for n in range(5)]
        codes = [r.status_code for r in answers]
        assert 202 in codes and 500 not in codes, codes
        full = next(r for r in answers if r.status_code != 202)
        assert full.status_code == 503 and full.json()["error"]["code"] == "input_store_full"
        assert int(full.headers["Retry-After"]) > 0
    finally:
        stack.stop()
        subprocess.run(["umount", "-l", str(inputs)], capture_output=True)
