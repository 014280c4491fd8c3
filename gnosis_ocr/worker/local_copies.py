"""This host's copies of job inputs, so a 100-page document leaves the input store (Redis, a shared
directory or a bucket) once per host, not once per page.

Inputs never change once submitted (a job id names one document), so a local copy is never stale.
Copies live in one private directory per user on the host, shared by every pool process and thread;
the first claimant of a job fetches it under a per-job file lock while the others wait
and then read the file. Files are written to a unique temporary name and renamed, and the oldest
are removed once the directory grows past its byte budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator

from ..inputstore import write_atomic

log = logging.getLogger(__name__)


class LocalCopies:
    """Documents this host has fetched for its pages (GNOSIS_INPUT_CACHE_*): not the input store."""

    def __init__(self, directory: str | None, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.dir = directory or os.path.join(tempfile.gettempdir(), f"gnosis-inputs-{os.getuid()}")
        if max_bytes > 0:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            info = os.stat(self.dir)
            if info.st_uid != os.getuid() or info.st_mode & 0o077:
                log.warning("input cache %s is not private to this user; not using it", self.dir)
                self.max_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _path(self, job_id: str) -> str:
        return os.path.join(self.dir, job_id)

    def get(self, job_id: str) -> bytes | None:
        if not self.enabled:
            return None
        try:
            with open(self._path(job_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def fetching(self, job_id: str) -> Iterator[None]:
        """Held while one claimant fetches a job's input; others for the same job wait here."""
        if not self.enabled:
            yield
            return
        with open(self._path(job_id) + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, job_id: str, data: bytes) -> None:
        if not self.enabled or len(data) > self.max_bytes:
            return
        try:
            write_atomic(self._path(job_id), data)
        except OSError as exc:  # a full disk costs a Redis read per page, never the page
            log.warning("could not keep job %s's input locally: %s", job_id, exc)
            return
        self._trim()

    def drop(self, job_id: str) -> None:
        for path in (self._path(job_id), self._path(job_id) + ".lock"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _trim(self) -> None:
        entries = []
        with contextlib.suppress(OSError), os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.endswith((".lock", ".tmp")):
                    continue
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    entries.append((info.st_mtime, info.st_size, entry.name))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= self.max_bytes:
                break
            self.drop(name)  # another process may remove it first: both are fine
            total -= size
