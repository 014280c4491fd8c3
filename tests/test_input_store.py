"""Issue 11: documents on the shared bucket (a directory every API and worker mounts), not in Redis."""

from __future__ import annotations

import os
import time

import pytest
import requests

from gnosis_ocr.inputstore import ORPHAN_GRACE, DirectoryInputs
from tests.conftest import poll_job
from tests.docs import pdf_of_pages, text_image, words

pytestmark = pytest.mark.slow


def stored(root) -> list[str]:
    return sorted(f for _, _, files in os.walk(root) for f in files)


def test_documents_in_a_shared_directory_never_enter_redis(stack, tmp_path):
    root = tmp_path / "inputs"
    stack.env["GNOSIS_INPUT_STORE"] = str(root)
    url = stack.api()
    pdf = pdf_of_pages([[f"Bucket page {w}"] for w in ("one", "two", "three")])
    job = requests.post(f"{url}/v1/jobs", files={"file": ("b.pdf", pdf)}).json()
    assert stored(root) == [job["id"]]
    assert (root / job["id"][:2] / job["id"]).read_bytes() == pdf
    assert not stack.redis.exists(f"gnosis:job:{job['id']}:input")

    stack.worker()
    final = poll_job(url, job["id"], timeout=120)
    assert final["status"] == "succeeded", final
    text = requests.get(f"{url}/v1/jobs/{job['id']}/result").json()["text"]
    assert {"bucket", "page", "one", "two", "three"} <= set(words(text))
    assert stored(root) == []  # deleted with its job


def test_cancelled_and_deleted_jobs_take_their_files_with_them(stack, tmp_path):
    root = tmp_path / "inputs"
    stack.env["GNOSIS_INPUT_STORE"] = str(root)
    url = stack.api()
    jobs = [requests.post(f"{url}/v1/jobs", files={"file": (f"{i}.png", text_image(["x"]))}).json() for i in range(2)]
    assert len(stored(root)) == 2
    requests.post(f"{url}/v1/jobs/{jobs[0]['id']}/cancel")
    requests.delete(f"{url}/v1/jobs/{jobs[1]['id']}")
    assert stored(root) == []


def test_a_missing_input_fails_its_job_clearly(stack, tmp_path):
    root = tmp_path / "inputs"
    stack.env.update(GNOSIS_INPUT_STORE=str(root), GNOSIS_CACHE_VISIBILITY_WAIT="1")
    url = stack.api()
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["gone"]))}).json()
    os.unlink(root / job["id"][:2] / job["id"])  # a bucket emptied by hand
    stack.worker()
    final = poll_job(url, job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "input_missing", final


def test_files_whose_jobs_ended_are_swept(tmp_path):
    store = DirectoryInputs(str(tmp_path))
    for job_id in ("a" * 32, "b" * 32):
        store.put(job_id, b"doc")
        old = time.time() - ORPHAN_GRACE - 1
        os.utime(tmp_path / job_id[:2] / job_id, (old, old))
    store.put("c" * 32, b"new")  # too young to judge: its record may still be on its way
    assert store.sweep(lambda job_id: job_id == "a" * 32) == 1
    assert stored(tmp_path) == ["a" * 32, "c" * 32]


def db_bytes(client) -> int:
    """What this database's keys take (MEMORY USAGE of each): the server's own total counts the other
    databases too, which parallel test processes are using."""
    return sum(client.memory_usage(key, samples=0) or 0 for key in client.scan_iter(count=1000))


@pytest.mark.parametrize("where", ["redis", "directory"])
def test_redis_bytes_per_queued_100kb_job(stack, tmp_path, where):
    from tests.test_greedy_clients import noise_png

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

    from tests.test_redis_pressure import noisy_png

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
