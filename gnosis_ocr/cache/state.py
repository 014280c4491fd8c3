"""What every process can know about the shared cache from Redis, plus the files when mounted.

The API reads this for GET /v1/cache without the bucket mounted: the downloader
mirrors the manifest's summary into Redis when it publishes.
"""

from __future__ import annotations

import os
import re
import time

import redis

from .. import keys
from ..job import now_rfc3339
from ..settings import Settings
from .lease import Lease

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def lease_name(settings: Settings) -> str:
    return keys.cache_lease(settings.model_id)


def repo_folder(model_id: str) -> str:
    return "models--" + model_id.replace("/", "--")


def gnosis_dir(settings: Settings) -> str:
    """Our own bookkeeping beside the hub cache, so the hub layout stays exactly the hub's."""
    return os.path.join(settings.model_cache_path, "gnosis", repo_folder(settings.model_id))


def manifest_path(settings: Settings, sha: str) -> str:
    return os.path.join(gnosis_dir(settings), "manifests", f"{sha}.json")


def snapshot_path(settings: Settings, sha: str) -> str:
    return os.path.join(settings.hub_cache, repo_folder(settings.model_id), "snapshots", sha)


class CacheState:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.record_key = keys.cache_record(settings.model_id, settings.model_revision)
        self.ref_key = keys.cache_ref(settings.model_id, settings.model_revision)
        self.lease_key = Lease.key_of(lease_name(settings))

    def resolved_sha(self) -> str | None:
        """The commit sha this revision was resolved to by a downloader; a sha resolves to itself."""
        if SHA_RE.match(self.settings.model_revision):
            return self.settings.model_revision
        value = self.redis.get(self.ref_key)
        if value:
            return value.decode()
        # Survives a Redis that lost its data: the downloader also writes the ref beside the manifests.
        ref = os.path.join(gnosis_dir(self.settings), "refs", self.settings.model_revision)
        try:
            with open(ref) as f:
                sha = f.read().strip()
        except OSError:
            return None
        return sha if SHA_RE.match(sha) else None

    def record_resolved(self, sha: str) -> None:
        self.redis.set(self.ref_key, sha)
        _write_atomic(os.path.join(gnosis_dir(self.settings), "refs", self.settings.model_revision), sha)

    def publish_hub_ref(self, sha: str) -> None:
        """Write the hub's own refs/<revision>, so other tools find the snapshot offline by repo id."""
        if not SHA_RE.match(self.settings.model_revision):
            ref = os.path.join(self.settings.hub_cache, repo_folder(self.settings.model_id), "refs",
                               self.settings.model_revision)
            _write_atomic(ref, sha)

    def record(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.record_key).items()}

    def mark(self, state: str, **fields: object) -> None:
        self.redis.hset(self.record_key, mapping={"state": state, "updated_at": now_rfc3339(),
                                                  **{k: str(v) for k, v in fields.items()}})

    def request_warm(self) -> bool:
        """True for the one caller that should enqueue a warm-up; others see one already asked for."""
        return bool(self.redis.set(keys.cache_warm_requested(self.settings.model_id, self.settings.model_revision),
                                   str(time.time()), nx=True, ex=max(self.settings.lease_ttl * 2, 60)))

    def describe(self) -> dict:
        record = self.record()
        sha = self.resolved_sha()
        holder = self.redis.get(self.lease_key)
        state = self._state(record, sha, holder is not None)
        return {
            "model_id": self.settings.model_id,
            "revision": self.settings.model_revision,
            "resolved_revision": sha,
            "state": state,
            "files": int(record.get("files", 0)) if state != "absent" else 0,
            "bytes": int(record.get("bytes", 0)) if state != "absent" else 0,
            "downloader": holder.decode() if holder else None,
            "published_at": record.get("published_at"),
            "last_verified": record.get("verified_at"),
            "last_verification": record.get("verification"),
            "bad_files": [f for f in record.get("bad_files", "").split(",") if f],
            "cache_path": self.settings.hub_cache,
        }

    def _state(self, record: dict[str, str], sha: str | None, downloading: bool) -> str:
        if downloading:
            return "downloading"
        recorded = record.get("state", "absent")
        if recorded == "corrupt":
            return "corrupt"
        if sha and os.path.isdir(self.settings.model_cache_path):
            # With the bucket mounted the files are the truth; Redis may have been flushed.
            return "ready" if os.path.exists(manifest_path(self.settings, sha)) else "absent"
        # Without the mount (the API on its own host) Redis is all there is. A "downloading" record
        # with no lease holder is a downloader that died.
        return "ready" if recorded == "ready" and record.get("sha") in (None, sha) else "absent"


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
