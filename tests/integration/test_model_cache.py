"""The shared model cache: one download across all workers, snapshots complete or invisible, loads strictly offline."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from gnosis_ocr.cache.state import manifest_path, repo_folder
from gnosis_ocr.settings import Settings
from harness.docs import text_image
from harness.hubstub import TINY_REPO, HubStub
from harness.stack import ROOT, poll_job, wait_until

REPO = TINY_REPO
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def padded_model(tmp_path_factory) -> Path:
    from harness.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("padded-model"), pad_mb=6)


def nanonets_env(stack, stub: HubStub, **extra: str) -> dict[str, str]:
    env = {"OCR_ENGINE": "nanonets", "OCR_MODEL_ID": REPO, "HF_ENDPOINT": stub.url, "OCR_MAX_NEW_TOKENS": "4",
           "OCR_DEVICE": "cpu", "GNOSIS_LEASE_TTL": "3", **extra}
    stack.env.update(env)
    return env


def settings_for(stack) -> Settings:
    return Settings.from_env({"MODEL_CACHE_PATH": stack.env["MODEL_CACHE_PATH"], "OCR_MODEL_ID": REPO})


def cli(stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", *args], cwd=ROOT, env=stack.env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot_dir(stack, stub: HubStub) -> Path:
    return Path(stack.env["MODEL_CACHE_PATH"], "hub", repo_folder(REPO), "snapshots", stub.sha)


def ocr_one_page(url: str) -> dict:
    job = requests.post(f"{url}/v1/jobs", files={"file": ("p.png", text_image(["tiny model page"]))}).json()
    return poll_job(url, job["id"], timeout=120)


def test_three_workers_on_an_empty_cache_download_each_file_once(stack, hub):
    nanonets_env(stack, hub)
    url = stack.api()
    workers = [stack.worker(wait_ready=False) for _ in range(3)]
    for w in workers:
        stack.wait_worker_ready(w, timeout=180)

    assert set(hub.file_gets) == set(hub.files)
    assert all(n == 1 for n in hub.file_gets.values()), dict(hub.file_gets)
    assert all("engine nanonets ready" in w.log() for w in workers)

    jobs = [requests.post(f"{url}/v1/jobs", files={"file": (f"{i}.png", text_image([f"page {i}"]))}).json()
            for i in range(3)]
    for job in jobs:
        final = poll_job(url, job["id"], timeout=120)
        assert final["status"] == "succeeded", final
    result = requests.get(f"{url}/v1/jobs/{jobs[0]['id']}/result").json()
    assert result["model"] == {"id": REPO, "revision": hub.sha}

    def counted(name: str, text: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    # Each worker looked once: a miss, or a hit for one that started after the download was published.
    metrics = wait_until(lambda: (t := requests.get(f"{url}/metrics").text)
                         and counted("gnosis_cache_misses_total", t) + counted("gnosis_cache_hits_total", t) == 3
                         and t, timeout=30, message="three cache lookups to be counted")
    assert counted("gnosis_cache_misses_total", metrics) >= 1
    assert f"gnosis_cache_bytes_downloaded_total {float(hub.model_bytes)}" in metrics
    cache = requests.get(f"{url}/v1/cache").json()
    assert cache["state"] == "ready" and cache["resolved_revision"] == hub.sha
    assert cache["files"] == len(hub.files) and cache["bytes"] == hub.model_bytes


def test_killed_downloader_is_replaced_and_nothing_partial_is_loaded(stack, padded_model):
    stub = HubStub(REPO, padded_model, rate=1.5 * 1024 * 1024).start()
    try:
        nanonets_env(stack, stub)
        url = stack.api()
        first = stack.worker(wait_ready=False)
        lease_key = f"gnosis:cache:{REPO}:lease"
        wait_until(lambda: stub.bytes_served > 1024 * 1024, timeout=90, message="the download to be under way")
        holder = stack.redis.get(lease_key)
        assert holder is not None
        assert not os.path.exists(manifest_path(settings_for(stack), stub.sha))
        # The revision's ref moves only when the snapshot is published, never while it is half there.
        from gnosis_ocr.cache.state import CacheState

        assert CacheState(stack.redis, settings_for(stack)).resolved_sha() is None

        first.kill_tree()  # the whole worker, as when its host disappears
        killed_at = time.monotonic()
        second = stack.worker(wait_ready=False)
        wait_until(lambda: stack.redis.get(lease_key) not in (None, holder), timeout=60,
                   message="another worker to take the lease")
        takeover = time.monotonic() - killed_at
        stack.wait_worker_ready(second, timeout=180)
        print(f"\nkill -> takeover: {takeover:.2f}s (lease TTL 3s)")

        assert "engine nanonets ready" not in first.log()
        assert cli(stack, "cache", "verify").returncode == 0
        big = max(stub.files, key=lambda n: stub.files[n]["size"])
        assert stub.file_gets[big] == 2  # the interrupted fetch, then the full one
        assert ocr_one_page(url)["status"] == "succeeded"
    finally:
        stub.stop()


@pytest.mark.parametrize("symlinks", [True, False], ids=["symlinks", "no-symlinks"])
def test_warm_start_sends_no_request_to_the_hub(stack, hub, symlinks):
    nanonets_env(stack, hub, **({} if symlinks else {"HF_HUB_DISABLE_SYMLINKS": "1"}))
    warm = cli(stack, "cache", "warm")
    assert warm.returncode == 0, warm.stderr
    assert "ready" in warm.stdout
    snapshot = snapshot_dir(stack, hub)
    assert (snapshot / "config.json").is_symlink() is symlinks
    hub.reset_counts()

    url = stack.api()
    stack.worker()
    assert ocr_one_page(url)["status"] == "succeeded"
    assert hub.requests == [], hub.requests


def _corrupt(path: Path) -> None:
    with open(path, "r+b") as f:  # same size, different bytes
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xde\xad\xbe\xef" * 16)


def test_corrupt_blob_is_named_refused_and_repaired(stack, hub):
    nanonets_env(stack, hub)
    assert cli(stack, "cache", "warm").returncode == 0
    weights = snapshot_dir(stack, hub) / "model.safetensors"

    _corrupt(weights.resolve())
    verify = cli(stack, "cache", "verify")
    assert verify.returncode == 1
    assert "model.safetensors" in verify.stderr
    status = cli(stack, "cache", "status")
    assert '"state": "corrupt"' in status.stdout and "model.safetensors" in status.stdout

    # A worker never loads it: it repairs the one bad file, then loads.
    url = stack.api()
    stack.worker()
    assert hub.file_gets["model.safetensors"] == 2
    assert all(n == 1 for name, n in hub.file_gets.items() if name != "model.safetensors")
    assert cli(stack, "cache", "verify").returncode == 0
    assert ocr_one_page(url)["status"] == "succeeded"


def test_worker_quick_check_catches_corruption_without_verify(stack, hub):
    nanonets_env(stack, hub)
    assert cli(stack, "cache", "warm").returncode == 0
    _corrupt((snapshot_dir(stack, hub) / "model.safetensors").resolve())
    stack.worker()
    assert hub.file_gets["model.safetensors"] == 2
    assert cli(stack, "cache", "verify").returncode == 0


def test_concurrent_warm_requests_start_one_download(stack, hub):
    nanonets_env(stack, hub)
    url = stack.api()
    stack.worker(OCR_ENGINE="null")  # serves the cache queue without loading a model itself
    assert requests.get(f"{url}/v1/cache").json()["state"] == "absent"

    answers = []

    def warm():
        answers.append(requests.post(f"{url}/v1/cache/warm").status_code)

    threads = [threading.Thread(target=warm) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [202, 202]
    wait_until(lambda: requests.get(f"{url}/v1/cache").json()["state"] == "ready", timeout=60,
               message="the cache to become ready")
    assert all(n == 1 for n in hub.file_gets.values()) and set(hub.file_gets) == set(hub.files)
    assert requests.post(f"{url}/v1/cache/warm").status_code == 200


def test_cache_state_without_the_mount_comes_from_redis(redis_url, tmp_path):
    import redis as redis_lib

    from gnosis_ocr.cache.state import CacheState

    settings = Settings.from_env({"MODEL_CACHE_PATH": str(tmp_path / "not-mounted"), "OCR_MODEL_ID": REPO,
                                  "OCR_MODEL_REVISION": "a" * 40})
    state = CacheState(redis_lib.Redis.from_url(redis_url), settings)
    assert state.describe()["state"] == "absent"
    state.mark("downloading", by="host:1")  # a downloader that died: no lease any more
    assert state.describe()["state"] == "absent"
    state.mark("ready", sha="a" * 40, files=7, bytes=1234)
    described = state.describe()
    assert (described["state"], described["files"], described["bytes"]) == ("ready", 7, 1234)
    state.redis.set(state.lease_key, "host:2#5")
    assert state.describe()["state"] == "downloading"


def test_the_lease_is_renewed_from_the_moment_it_is_taken(redis_url):
    import redis as redis_lib

    from gnosis_ocr.cache.lease import Lease

    lease = Lease(redis_lib.Redis.from_url(redis_url), "gnosis:test:repo", ttl=1.0)
    assert lease.acquire()
    try:
        # Whatever the holder does first (re-hashing gigabytes over FUSE) may outlast the TTL: it stays held.
        held_since = time.monotonic()

        def held_past_three_ttls() -> bool:
            assert lease.held(), "the lease expired before its holder was done"
            return time.monotonic() - held_since > 3

        wait_until(held_past_three_ttls, timeout=10, interval=0.1, message="three TTLs to pass")
    finally:
        lease.release()
    assert lease.holder() is None


def test_one_download_lease_per_repository_whatever_the_revision(redis_url, tmp_path):
    import redis as redis_lib

    from gnosis_ocr.cache.store import ModelCache

    client = redis_lib.Redis.from_url(redis_url)
    caches = [ModelCache(Settings.from_env({"MODEL_CACHE_PATH": str(tmp_path), "OCR_MODEL_ID": REPO,
                                            "OCR_MODEL_REVISION": revision}), client)
              for revision in ("main", "a" * 40)]
    assert caches[0].lease.acquire()
    try:
        assert not caches[1].lease.acquire()  # `main` and its pinned sha share blobs and partial files
    finally:
        caches[0].lease.release()


def test_a_corrupt_mark_is_cleared_once_the_cache_checks_whole(stack, hub):
    nanonets_env(stack, hub)
    assert cli(stack, "cache", "warm").returncode == 0
    from gnosis_ocr.cache.state import CacheState

    state = CacheState(stack.redis, settings_for(stack))
    state.mark("corrupt", sha=hub.sha, bad_files="model.safetensors")  # a reader's view, since repaired
    assert '"state": "corrupt"' in cli(stack, "cache", "status").stdout
    assert cli(stack, "cache", "warm").returncode == 0  # a hit: the quick check passes
    status = cli(stack, "cache", "status").stdout
    assert '"state": "ready"' in status and '"bad_files": []' in status
