"""Where submitted documents wait for their pages: in Redis (the default) or in a shared directory.

`GNOSIS_INPUT_STORE=redis` keeps each input in the job's Redis key, as small deployments want.
`GNOSIS_INPUT_STORE=/cache/inputs` (any absolute path on a volume every API and worker mounts, such
as the GCS FUSE bucket the model cache already uses) keeps them as files, so Redis holds records,
results and the queue only. Files follow the bucket's rules (docs/deploy.md): written to a unique
temporary name and renamed when complete, never appended to, never renamed as directories. A file
is deleted when its job ends (by whoever ends it) and any the deleter missed (a crash in between)
are removed by the workers' housekeeping once their job is final or gone.

One directory can serve several deployments (staging and production on one bucket, as the model
cache is meant to be shared): each keeps its inputs under its own namespace, the deployment id its
Redis holds (`gnosis:deployment`, made once), and sweeps only those. It marks its namespace alive at
every sweep; a namespace nobody marked for ABANDONED_AFTER (a deployment removed, or its Redis
replaced empty) is removed whole by whoever sweeps next.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator

from . import keys
from .errors import Unavailable

log = logging.getLogger(__name__)

ORPHAN_GRACE = 3600
"""Seconds a file without a live job is kept before the sweep removes it: the API writes the file
before the job record, and a slow submission must not lose its input."""

ABANDONED_AFTER = 8 * 24 * 3600
"""Seconds after which a namespace no deployment has marked alive is removed: longer than any job may
live (GNOSIS_JOB_MAX_AGE, 7 days by default). Files from before namespaces are judged by the same age."""

ALIVE_MARKER = ".alive"

REFRESH_SECONDS = 30.0
"""How long a process trusts the deployment id it read: a Redis replaced empty gets a new one, and
every process follows within this."""


def deployment_id(client) -> str:
    """The id of the deployment this Redis belongs to, made by the first process that asks."""
    client.set(keys.DEPLOYMENT, uuid.uuid4().hex[:16], nx=True)
    value = client.get(keys.DEPLOYMENT)
    return value.decode() if isinstance(value, bytes) else str(value)


class InputStore:
    """Where a deployment's submitted documents wait (GNOSIS_INPUT_STORE), behind one interface."""

    in_redis: bool
    """True when the job store's own scripts write and delete the bytes (and a page's claim can carry
    them): `put` and `delete` are then theirs, not this object's."""

    def put(self, job_id: str, data: bytes) -> None:
        raise NotImplementedError

    def fetch(self, job_id: str) -> bytes | None:
        """The document's bytes wherever they are kept; None when they are not (yet) there."""
        raise NotImplementedError

    def delete(self, job_id: str) -> None:
        raise NotImplementedError

    def sweep(self, is_live: Callable[[str], bool]) -> int:
        """Remove inputs whose jobs are over that a crash left behind; how many."""
        raise NotImplementedError


class RedisInputs(InputStore):
    """Inputs in each job's Redis key, written and deleted by the job store's scripts."""

    in_redis = True

    def __init__(self, client) -> None:
        self.redis = client

    def put(self, job_id: str, data: bytes) -> None:
        pass  # CREATE writes the key with the record

    def fetch(self, job_id: str) -> bytes | None:
        return self.redis.get(keys.job_input(job_id))

    def delete(self, job_id: str) -> None:
        pass  # the script that ends or discards the job deletes the key

    def sweep(self, is_live: Callable[[str], bool]) -> int:
        return 0  # the key goes with its job


class DirectoryInputs(InputStore):
    in_redis = False

    def __init__(self, root: str, namespace: Callable[[], str] | str = "") -> None:
        """`namespace`: this deployment's id, or how to read it (from Redis, when first needed: a process
        starts while Redis is away, and a Redis replaced empty names a new deployment)."""
        self.root = root
        self._namespace = namespace
        self._resolved: tuple[str, float] | None = None
        os.makedirs(root, exist_ok=True)

    @property
    def namespace(self) -> str:
        if isinstance(self._namespace, str):
            return self._namespace
        if self._resolved is None or time.monotonic() - self._resolved[1] > REFRESH_SECONDS:
            try:
                self._resolved = (self._namespace(), time.monotonic())
            except Exception:  # Redis away: the id read before still names this deployment
                if self._resolved is None:
                    raise
                log.warning("could not read the deployment id; keeping %s", self._resolved[0])
        return self._resolved[0]

    @property
    def base(self) -> str:
        return os.path.join(self.root, self.namespace) if self.namespace else self.root

    def _path(self, job_id: str, base: str | None = None) -> str:
        # Two levels keep directory listings short on object-store mounts.
        return os.path.join(base or self.base, job_id[:2], job_id)

    def put(self, job_id: str, data: bytes) -> None:
        path = self._path(job_id)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                # Full for now, not broken: the client should come back later (503 + Retry-After).
                raise Unavailable(f"The input store (GNOSIS_INPUT_STORE) is full: {exc.strerror}. Retry later.",
                                  code="input_store_full") from exc
            raise

    def fetch(self, job_id: str) -> bytes | None:
        # Where this release writes, then where releases before namespaces wrote (jobs queued across
        # an upgrade).
        for path in (self._path(job_id), self._path(job_id, self.root)):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                continue
        return None

    def delete(self, job_id: str) -> None:
        for path in (self._path(job_id), self._path(job_id, self.root)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def sweep(self, is_live: Callable[[str], bool]) -> int:
        """Remove this deployment's inputs (and stale temporary files) whose job is final or gone, files
        from before namespaces once older than any job, and namespaces abandoned for ABANDONED_AFTER.
        Other deployments' live namespaces are never touched."""
        base = self.base
        os.makedirs(base, exist_ok=True)
        write_atomic(os.path.join(base, ALIVE_MARKER), b"")  # the mtime is the mark
        removed = self._sweep_files(base, time.time() - ORPHAN_GRACE, is_live)
        if self.namespace:
            removed += self._sweep_files(self.root, time.time() - ABANDONED_AFTER, is_live)
            removed += self._remove_abandoned()
        if removed:
            log.info("removed %d input file(s) whose jobs had ended", removed)
        return removed

    def _sweep_files(self, base: str, cutoff: float, is_live: Callable[[str], bool]) -> int:
        removed = 0
        for path in _files(base):
            name = os.path.basename(path)
            try:
                if os.stat(path).st_mtime > cutoff:
                    continue
                if name.endswith(".tmp") or not is_live(name):
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _remove_abandoned(self) -> int:
        removed = 0
        cutoff = time.time() - ABANDONED_AFTER
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as entries:
            namespaces = [e.path for e in entries if e.is_dir() and len(e.name) > 2 and e.name != self.namespace]
        for path in namespaces:
            try:
                if os.stat(os.path.join(path, ALIVE_MARKER)).st_mtime > cutoff:
                    continue  # another deployment, alive
            except FileNotFoundError:
                if os.stat(path).st_mtime > cutoff:
                    continue  # being created right now, or not ours to judge yet
            for file in _files(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(file)
                    removed += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, ALIVE_MARKER))
            log.warning("removed input namespace %s: no deployment has marked it alive for %d days",
                        os.path.basename(path), ABANDONED_AFTER // 86400)
        return removed


def _files(base: str) -> Iterator[str]:
    """The input files under `base`: one level of shards (two hex characters), files inside."""
    with contextlib.suppress(FileNotFoundError), os.scandir(base) as shards:
        for shard in shards:
            if shard.is_dir() and len(shard.name) == 2:
                with contextlib.suppress(FileNotFoundError), os.scandir(shard.path) as files:
                    yield from (f.path for f in files if f.is_file())


def write_atomic(path: str, data: bytes) -> None:
    """Write to a unique temporary name beside `path`, then rename: readers see all of it or nothing."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def from_setting(value: str, client) -> InputStore:
    """The store GNOSIS_INPUT_STORE names; a directory is namespaced by `client`'s deployment id."""
    if value == "redis":
        return RedisInputs(client)
    return DirectoryInputs(value, lambda: deployment_id(client))
