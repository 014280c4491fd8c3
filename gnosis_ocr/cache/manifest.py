"""The completeness mark: every file with its size and sha256, written last and atomically.

A snapshot without a valid manifest is never loaded. Readers re-hash only files
whose size or mtime differ from the manifest (the rsync quick check); `verify`
re-hashes everything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from ..errors import CacheUnreadable

MANIFEST_VERSION = 1
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str
    mtime_ns: int = 0


@dataclass(frozen=True)
class Manifest:
    repo_id: str
    sha: str
    files: list[FileEntry]
    created_at: str
    created_by: str
    fence: int
    version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def write(path: str, manifest: Manifest) -> None:
    """Write to a unique temp file, flush it to storage, then replace: readers see all or nothing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path: str) -> Manifest | None:
    """The manifest at `path`, or None when absent or unreadable (an unreadable one marks nothing)."""
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("version") != MANIFEST_VERSION:
            return None
        files = [FileEntry(**entry) for entry in raw.pop("files")]
        return Manifest(files=files, **raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: str) -> str:
    """The hub's id for a non-LFS file (git's blob hash)."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


MISSING = (errno.ENOENT, errno.ENOTDIR)
"""What a stat answers for a file that is not there: anything else is this host failing to read it."""


@dataclass
class Check:
    """What a snapshot check found: files missing or different (`bad`), and files re-hashed whole
    because their mtime moved (a metadata-only rewrite of the bucket) that matched (`rehashed`, with
    their mtime now)."""

    bad: list[str] = field(default_factory=list)
    rehashed: dict[str, int] = field(default_factory=dict)


def check(manifest: Manifest, snapshot: str, *, full: bool = False, workers: int = 8) -> Check:
    """Check each file of `snapshot` against `manifest`: size and mtime (the rsync quick check), and the
    sha256 where either moved or `full`. Raises CacheUnreadable when this host cannot read a file (an
    I/O error, a mount gone), which is not the file's fault."""

    def one(entry: FileEntry) -> tuple[str, bool, int]:
        path = os.path.join(snapshot, entry.name)
        try:
            st = os.stat(path)  # follows the snapshot's symlink to its blob, where there is one
        except OSError as exc:
            if exc.errno in MISSING:
                return entry.name, False, 0
            raise CacheUnreadable(f"{entry.name} cannot be read on this host: {exc.strerror}") from exc
        if st.st_size != entry.size:
            return entry.name, False, 0
        if full or st.st_mtime_ns != entry.mtime_ns:
            try:
                same = sha256_file(path) == entry.sha256
            except OSError as exc:
                raise CacheUnreadable(f"{entry.name} cannot be read on this host: {exc.strerror}") from exc
            return entry.name, same, st.st_mtime_ns if same and st.st_mtime_ns != entry.mtime_ns else 0
        return entry.name, True, 0

    out = Check()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, ok, mtime in pool.map(one, manifest.files):
            if not ok:
                out.bad.append(name)
            elif mtime:
                out.rehashed[name] = mtime
    return out


def bad_files(manifest: Manifest, snapshot: str, *, full: bool = False, workers: int = 8) -> list[str]:
    """Names of files missing or not matching the manifest; empty means the snapshot is complete."""
    return check(manifest, snapshot, full=full, workers=workers).bad


def with_mtimes(manifest: Manifest, mtimes: dict[str, int]) -> Manifest:
    """The same manifest with these files' mtimes: what the quick check compares next time."""
    files = [replace(f, mtime_ns=mtimes.get(f.name, f.mtime_ns)) for f in manifest.files]
    return replace(manifest, files=files)
