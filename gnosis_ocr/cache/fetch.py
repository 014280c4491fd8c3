"""The downloader process: the only code that talks to the hub, run by the lease holder.

Run as `python -m gnosis_ocr.cache.fetch`, with the hub reachable. It keeps
what is intact, re-fetches what is missing or wrong, checks every file against
the hub's hashes, and reports on stdout as JSON lines. It writes no manifest:
the parent publishes one only while it still holds the lease.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from ..errors import LeaseLost
from .manifest import git_blob_sha1, sha256_file


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _matches(path: str, size: int | None, lfs_sha256: str | None, blob_id: str | None) -> bool:
    try:
        if size is not None and os.path.getsize(path) != size:
            return False
        if lfs_sha256:
            return sha256_file(path) == lfs_sha256
        return blob_id is None or git_blob_sha1(path) == blob_id
    except OSError:
        return False


class Fence:
    """The lease this process runs under. Every destructive step checks it first: a holder whose lease
    ran out (paused, partitioned) must not delete what a new holder is writing."""

    def __init__(self, key: str | None, value: str | None) -> None:
        self.key, self.value, self._client = key, value, None
        if key and value and os.environ.get("GNOSIS_FETCH_REDIS_URL"):
            from ..redisconn import connect

            self._client = connect(os.environ["GNOSIS_FETCH_REDIS_URL"], socket_timeout=10, socket_connect_timeout=10)

    def check(self) -> None:
        if self._client is None:
            return
        import redis

        try:
            current = self._client.get(self.key)
        except redis.RedisError as exc:  # cannot tell: then nothing is deleted
            raise LeaseLost(f"The download lease cannot be checked ({exc}); not deleting anything.") from exc
        if current is None or current.decode() != self.value:
            raise LeaseLost("The download lease is no longer this downloader's; stopping before deleting anything.")


def _discard(path: str, fence: Fence) -> None:
    """Remove a snapshot entry and, where it is a symlink, the blob it points to."""
    fence.check()
    if os.path.islink(path):
        blob = os.path.realpath(path)
        if os.path.exists(blob):
            os.unlink(blob)
    if os.path.lexists(path):
        os.unlink(path)


def fetch(repo_id: str, revision: str, cache_dir: str, workers: int, fence: Fence | None = None) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    fence = fence or Fence(None, None)

    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    sha = info.sha
    siblings = [s for s in info.siblings or []]
    emit("resolved", sha=sha, files=len(siblings), bytes=sum(s.size or 0 for s in siblings))

    storage = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", sha)
    # Only the lease holder runs this, so temp files left here are a dead downloader's.
    fence.check()
    for stale in glob.glob(os.path.join(storage, "blobs", "*.incomplete")):
        try:
            os.unlink(stale)
        except OSError:
            pass

    def spec(s):
        return s.size, (s.lfs.sha256 if s.lfs else None), s.blob_id

    missing = []
    for s in siblings:
        path = os.path.join(snapshot, s.rfilename)
        if os.path.exists(path) and _matches(path, *spec(s)):
            emit("file", name=s.rfilename, size=s.size, downloaded=False)
        else:
            _discard(path, fence)
            missing.append(s)

    def download(s) -> int:
        path = hf_hub_download(repo_id, s.rfilename, revision=sha, cache_dir=cache_dir, token=token)
        if not _matches(path, *spec(s)):
            _discard(path, fence)
            raise OSError(f"{s.rfilename} does not match the hub's hash after download")
        emit("file", name=s.rfilename, size=s.size, downloaded=True)
        return s.size or os.path.getsize(path)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        downloaded = sum(pool.map(download, missing))

    files = []
    for s in siblings:
        path = os.path.join(snapshot, s.rfilename)
        st = os.stat(path)
        digest = s.lfs.sha256 if s.lfs else sha256_file(path)
        files.append({"name": s.rfilename, "size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns})
    emit("done", sha=sha, files=files, bytes_downloaded=downloaded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gnosis_ocr.cache.fetch")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--lease-key", help="the lease this downloader holds: checked before deleting anything")
    parser.add_argument("--lease-value")
    args = parser.parse_args(argv)
    try:
        fetch(args.repo, args.revision, args.cache_dir, args.workers, Fence(args.lease_key, args.lease_value))
    except Exception as exc:  # reported to the parent as one line; it decides what to do
        emit("error", type=type(exc).__name__, message=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
