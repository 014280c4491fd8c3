"""ModelCache: find a complete snapshot, or elect one downloader across all hosts and wait for it.

    hit:   resolved sha -> manifest -> quick check -> snapshot path
    miss:  take the lease -> run the downloader process -> write the manifest last -> publish
    busy:  wait on the lease's events (woken at once when it is published) -> load

A downloader that dies stops renewing its lease; the lease expires and a waiter
takes over. Anything the dead one left is checked against the hub's hashes
before reuse, and only a lease holder writes a manifest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from .. import backoff
from ..errors import DownloadStalled, DownloadTimeout, LeaseLost, ModelCacheError
from ..job import now_rfc3339
from ..metrics import Metrics
from ..processes import die_with_parent
from ..settings import Settings
from . import manifest as mf
from .lease import Lease
from .state import CacheState, lease_name, manifest_path, repo_folder, snapshot_path

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


class ModelCache:
    def __init__(self, settings: Settings, client: redis.Redis, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.redis = client
        self.metrics = metrics or Metrics(client)
        self.state = CacheState(client, settings)
        self.lease = Lease(client, lease_name(settings), ttl=settings.lease_ttl)

    # ---- reading -------------------------------------------------------------------------

    def complete_snapshot(self, sha: str) -> Path | None:
        """The snapshot path if its manifest exists and its files match; None otherwise."""
        manifest = mf.read(manifest_path(self.settings, sha))
        if manifest is None or manifest.sha != sha:
            return None
        snapshot = snapshot_path(self.settings, sha)
        # CacheUnreadable (this host cannot read the mount) goes up as it is: not a reason to mark the
        # cluster's cache corrupt, nor to repair it.
        result = mf.check(manifest, snapshot, full=self.settings.cache_verify == "full")
        bad = result.bad
        if result.rehashed and not bad:
            self._record_mtimes(manifest, result.rehashed)
        if bad:
            log.error("cache for %s@%s is corrupt (%s); it will be repaired", self.settings.model_id, sha[:12],
                      ", ".join(bad))
            self.state.mark("corrupt", sha=sha, bad_files=",".join(bad))
            return None
        record = self.state.record()
        if record.get("state") == "corrupt" and record.get("sha") in (None, sha):
            # A reader saw it broken (a repair since, or a FUSE view that caught up): it is whole now.
            self.state.mark("ready", sha=sha, files=len(manifest.files), bytes=manifest.total_bytes, bad_files="")
        return Path(snapshot)

    def _record_mtimes(self, manifest: mf.Manifest, mtimes: dict[str, int]) -> None:
        """Files whose mtime moved but whose bytes matched (the bucket rewrote their metadata: a storage
        class change, a copy) go into the manifest with their new mtime, so the next start's quick check
        does not re-hash gigabytes again. Only under the lease, and only over the manifest just checked."""
        path = manifest_path(self.settings, manifest.sha)
        ours = self.lease.fence > 0
        if not ours and not self.lease.acquire():
            return  # someone is downloading or verifying: the next start records them
        try:
            if self.lease.held() and mf.read(path) == manifest:
                mf.write(path, mf.with_mtimes(manifest, mtimes))
                log.info("recorded new mtimes of %d re-hashed file(s) of %s@%s", len(mtimes),
                         self.settings.model_id, manifest.sha[:12])
        finally:
            if not ours:
                self.lease.release("released")

    def _wait_visible(self, sha: str) -> Path | None:
        # Another host published it: give this host's metadata cache time to notice the new file.
        record = self.state.record()
        if record.get("state") != "ready" or record.get("sha") != sha:
            return None
        # Polling the filesystem: there is no event to wait on across hosts.
        if backoff.poll(lambda: os.path.exists(manifest_path(self.settings, sha)) or None,
                        timeout=self.settings.cache_visibility_wait, first=0.05, cap=2.0):
            return self.complete_snapshot(sha)
        return None

    def ensure_ready(self, progress: Progress | None = None, *, refresh: bool = False) -> Path:
        """The snapshot path of a complete model, downloading it (once, cluster-wide) if needed."""
        deadline = time.monotonic() + self.settings.lease_wait
        first = True
        wait_started: float | None = None
        while True:
            sha = None if refresh else self.state.resolved_sha()
            path = None
            if sha:
                path = self.complete_snapshot(sha) or self._wait_visible(sha)
            if path is not None:
                if first:
                    self.metrics.inc("gnosis_cache_hits_total")
                if wait_started is not None:
                    self.metrics.observe("gnosis_cache_lock_wait_seconds", time.monotonic() - wait_started)
                return path
            if first:
                self.metrics.inc("gnosis_cache_misses_total")
                first = False
            if self.lease.acquire():
                if wait_started is not None:
                    self.metrics.observe("gnosis_cache_lock_wait_seconds", time.monotonic() - wait_started)
                try:
                    return self._download(progress, refresh=refresh)
                finally:
                    self.lease.release("released")
            if wait_started is None:
                wait_started = time.monotonic()
                log.info("model download in progress elsewhere (%s); waiting", self.lease.holder())
                if progress:
                    progress({"event": "waiting", "holder": self.lease.holder()})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DownloadTimeout(
                    f"Waited {self.settings.lease_wait}s for another worker's download of {self.settings.model_id}.")
            # Woken by the holder's release at once; otherwise recheck once a lease TTL has passed.
            self.lease.wait_for_change(min(remaining, self.settings.lease_ttl))
            refresh = False

    # ---- writing (lease holder only) -------------------------------------------------------

    def _download(self, progress: Progress | None, *, refresh: bool) -> Path:
        sha = None if refresh else self.state.resolved_sha()
        if sha and (path := self.complete_snapshot(sha)):
            return path  # finished by the previous holder between our check and our lease
        if sha:
            # Nobody may load a snapshot while its files are being replaced.
            try:
                os.unlink(manifest_path(self.settings, sha))
            except FileNotFoundError:
                pass
        started = time.monotonic()
        self.state.mark("downloading", by=self.lease.token, started_at=now_rfc3339())
        proc = self._spawn_fetch()
        self.lease.on_lost = lambda: _kill(proc)  # renewed since acquire(); released by our caller
        try:
            result = self._follow(proc, progress)
        except BaseException:
            _kill(proc)
            self.metrics.inc("gnosis_cache_downloads_total", outcome="failed")
            raise
        sha = result["sha"]
        files = [mf.FileEntry(**entry) for entry in result["files"]]
        manifest = mf.Manifest(repo_id=self.settings.model_id, sha=sha, files=files, created_at=now_rfc3339(),
                               created_by=self.lease.token, fence=self.lease.fence)
        # The fence check: a holder whose lease expired (paused, partitioned) publishes nothing.
        if not self.lease.held():
            self.metrics.inc("gnosis_cache_downloads_total", outcome="lease_lost")
            raise LeaseLost("The download lease expired before the manifest could be written.")
        mf.write(manifest_path(self.settings, sha), manifest)
        self.state.record_resolved(sha)
        self.state.publish_hub_ref(sha)
        self.state.mark("ready", sha=sha, files=len(files), bytes=manifest.total_bytes, fence=self.lease.fence,
                        published_at=manifest.created_at, published_by=self.lease.token, bad_files="")
        seconds = time.monotonic() - started
        self.metrics.inc("gnosis_cache_bytes_downloaded_total", result.get("bytes_downloaded", 0))
        self.metrics.inc("gnosis_cache_downloads_total", outcome="succeeded")
        self.metrics.observe("gnosis_cache_download_seconds", seconds)
        log.info("model %s@%s published: %d files, %d bytes downloaded in %.1fs", self.settings.model_id,
                 sha[:12], len(files), result.get("bytes_downloaded", 0), seconds)
        if progress:
            progress({"event": "ready", "sha": sha, "files": len(files), "bytes": manifest.total_bytes})
        return Path(snapshot_path(self.settings, sha))

    def _spawn_fetch(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        env["GNOSIS_FETCH_REDIS_URL"] = self.settings.redis_url
        # The hub serves large files through Xet. hf_xet keeps its chunk cache and logs under
        # HF_XET_CACHE (by default $HF_HOME/xet: here the bucket, shared and slow) and reconstructs a file
        # with parallel vectored writes, which are known to stall on network filesystems. Its state goes
        # to this host's disk, and a file is written piece after piece; the blobs still land in the bucket.
        env.setdefault("HF_XET_CACHE", os.path.join(tempfile.gettempdir(), "gnosis-xet"))
        env.setdefault("HF_XET_RECONSTRUCTION_USE_VECTORED_WRITE", "false")
        cmd = [sys.executable, "-m", "gnosis_ocr.cache.fetch", "--repo", self.settings.model_id,
               "--revision", self.settings.model_revision, "--cache-dir", self.settings.hub_cache,
               "--workers", str(self.settings.download_workers),
               "--lease-key", self.lease.key, "--lease-value", self.lease.value]
        # SIGKILL with its parent: a downloader never writes on unsupervised.
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True,
                                preexec_fn=die_with_parent(signal.SIGKILL))

    def _follow(self, proc: subprocess.Popen, progress: Progress | None) -> dict:
        result = None
        error = None
        assert proc.stdout is not None
        watchdog = _Watchdog(proc, os.path.join(self.settings.hub_cache, repo_folder(self.settings.model_id), "blobs"),
                             self.settings.download_stall_timeout)
        for line in proc.stdout:
            watchdog.moved()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            # The revision's ref moves only when its snapshot is published, never while it is half there.
            if event["event"] == "done":
                result = event
            elif event["event"] == "error":
                error = event
            if progress:
                progress(event)
        code = proc.wait()
        watchdog.stop()
        if watchdog.fired:
            raise DownloadStalled(f"Downloading {self.settings.model_id} made no progress for "
                                  f"{self.settings.download_stall_timeout:.0f}s (GNOSIS_DOWNLOAD_STALL_TIMEOUT); "
                                  "it was stopped and will be started again.")
        if self.lease.lost.is_set():
            raise LeaseLost("The download lease was lost; another worker will finish the download.")
        if code != 0 or result is None:
            detail = f"{error['type']}: {error['message']}" if error else f"exit status {code}"
            raise ModelCacheError(f"Downloading {self.settings.model_id} failed: {detail}")
        return result

    # ---- verification ----------------------------------------------------------------------

    def verify(self) -> tuple[str, list[str]]:
        """Re-hash every file against the manifest. Returns (sha, bad file names); raises if absent, or
        if a download holds the lease (its files are moving). Holds the lease while it hashes, so the
        manifest it removes when a file is bad is the very one it checked."""
        if not self.lease.acquire():
            raise ModelCacheError(f"A download of {self.settings.model_id} is in progress ({self.lease.holder()}); "
                                  "verify once it is done.", code="cache_busy")
        try:
            sha = self.state.resolved_sha()
            path = manifest_path(self.settings, sha) if sha else None
            manifest = mf.read(path) if path else None
            if manifest is None:
                raise ModelCacheError(f"No complete cache of {self.settings.model_id} to verify.",
                                      code="cache_absent")
            result = mf.check(manifest, snapshot_path(self.settings, manifest.sha), full=True)
            if not self.lease.held():
                raise LeaseLost("The cache lease was lost while verifying; nothing was changed.")
            stamp = now_rfc3339()
            if result.bad:
                self.state.mark("corrupt", sha=manifest.sha, bad_files=",".join(result.bad), verified_at=stamp,
                                verification="failed")
                # Invalidate it so that no worker loads it; the next warm or worker repairs it.
                if mf.read(path) == manifest:
                    os.unlink(path)
            else:
                if result.rehashed:
                    mf.write(path, mf.with_mtimes(manifest, result.rehashed))
                self.state.mark("ready", sha=manifest.sha, files=len(manifest.files), bytes=manifest.total_bytes,
                                verified_at=stamp, verification="passed", bad_files="")
            return manifest.sha, result.bad
        finally:
            self.lease.release("released")


class _Watchdog:
    """Kills a download that makes no progress: no file finished and no byte more under `blobs` (where
    every transfer writes, Xet's included) for `stall` seconds. A transfer that hangs without an error
    would otherwise hold the lease, renewed, and every worker waiting on it, forever."""

    def __init__(self, proc: subprocess.Popen, blobs: str, stall: float) -> None:
        self.proc, self.blobs, self.stall = proc, blobs, stall
        self.fired = False
        self._at = time.monotonic()
        self._size = -1
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="download-watchdog", daemon=True).start()

    def moved(self) -> None:
        self._at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(10.0, self.stall / 4)) and self.proc.poll() is None:
            size = _bytes_under(self.blobs)
            if size != self._size:
                self._size = size
                self.moved()
            elif time.monotonic() - self._at > self.stall:
                log.error("model download made no progress for %.0fs; stopping it", self.stall)
                self.fired = True
                _kill(self.proc)
                return


def _bytes_under(folder: str) -> int:
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return -1
    return total


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
