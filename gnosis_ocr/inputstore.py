"""Where submitted documents wait for their pages: in Redis (the default) or in a shared directory.

`GNOSIS_INPUT_STORE=redis` keeps each input in the job's Redis key, as small deployments want.
`GNOSIS_INPUT_STORE=/cache/inputs` (any absolute path on a volume every API and worker mounts, such
as the GCS FUSE bucket the model cache already uses) keeps them as files, so Redis holds records,
results and the queue only. Files follow the bucket's rules (docs/deploy.md): written to a unique
temporary name and renamed when complete, never appended to, never renamed as directories. A file
is deleted when its job ends (by whoever ends it) and any the deleter missed (a crash in between)
are removed by the workers' housekeeping once their job is final or gone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator

from .errors import Unavailable

log = logging.getLogger(__name__)

ORPHAN_GRACE = 3600
"""Seconds a file without a live job is kept before the sweep removes it: the API writes the file
before the job record, and a slow submission must not lose its input."""


class InputStore:
    """Inputs in Redis: the job store's own scripts write, read and delete them."""

    in_redis = True

    def put(self, job_id: str, data: bytes) -> None:
        pass

    def get(self, job_id: str) -> bytes | None:
        raise NotImplementedError("inputs in Redis are read with the page claim")

    def delete(self, job_id: str) -> None:
        pass

    def sweep(self, is_live: Callable[[str], bool]) -> int:
        return 0


class DirectoryInputs(InputStore):
    in_redis = False

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _path(self, job_id: str) -> str:
        # Two levels keep directory listings short on object-store mounts.
        return os.path.join(self.root, job_id[:2], job_id)

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

    def get(self, job_id: str) -> bytes | None:
        try:
            with open(self._path(job_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(job_id))

    def sweep(self, is_live: Callable[[str], bool]) -> int:
        """Remove inputs (and stale temporary files) whose job is final or gone."""
        removed = 0
        cutoff = time.time() - ORPHAN_GRACE
        for path in self._files():
            name = os.path.basename(path)
            try:
                if os.stat(path).st_mtime > cutoff:
                    continue
                if name.endswith(".tmp") or not is_live(name):
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d input file(s) whose jobs had ended", removed)
        return removed

    def _files(self) -> Iterator[str]:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as shards:
            for shard in shards:
                if shard.is_dir():
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


def from_setting(value: str) -> InputStore:
    return InputStore() if value == "redis" else DirectoryInputs(value)
