"""Objects in Google Cloud Storage for batches: `gs://bucket/prefix` URIs, the allow-list, listing,
ranged and bounded reads, writes. Through google-cloud-storage, which honours STORAGE_EMULATOR_HOST
(fake-gcs-server in the tests)."""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import BadRequest, Forbidden, TooLarge

LIST_PAGE = 1000
"""Objects asked for per listing call: a huge prefix is read a page at a time, never held whole."""

_client = None
_lock = threading.Lock()


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # '' or ending in '/'

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}"

    def join(self, relative: str) -> str:
        return self.prefix + relative


def parse(uri: str, *, field: str = "source") -> Location:
    """`gs://bucket/some/prefix/` as a Location (a prefix always ends with '/')."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise BadRequest(f"{field} must be a gs://bucket/prefix/ URI.", code="invalid_parameter")
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not bucket or any(part in ("..", ".") for part in prefix.split("/")):
        raise BadRequest(f"{field} {uri!r} is not a gs://bucket/prefix/ URI.", code="invalid_parameter")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return Location(bucket, prefix)


def check_allowed(location: Location, allowed: tuple[str, ...], *, field: str = "source") -> None:
    """Only under a prefix of GNOSIS_BATCH_BUCKETS: a caller must not make the service read or write a
    bucket merely because its service account can."""
    if not allowed:
        raise Forbidden("Batches are off on this server (GNOSIS_BATCH_BUCKETS is empty).", code="batches_disabled")
    for entry in allowed:
        base = parse(entry, field="GNOSIS_BATCH_BUCKETS")
        if location.bucket == base.bucket and location.prefix.startswith(base.prefix):
            return
    raise Forbidden(f"{field} {location.uri} is outside the prefixes this server may use (GNOSIS_BATCH_BUCKETS).",
                    code="forbidden_source")


def relative_name(name: str, location: Location) -> str | None:
    """The object's path below the prefix, or None for names that must never become paths ('..',
    absolute, empty parts) and for "directory" placeholders."""
    if not name.startswith(location.prefix) or name.endswith("/"):
        return None
    rel = name[len(location.prefix):]
    if not rel or rel.startswith("/") or "\\" in rel or posixpath.normpath(rel) != rel:
        return None
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return rel


def client():
    global _client
    with _lock:
        if _client is None:
            from google.cloud import storage

            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                _client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "gnosis"),
                                         credentials=AnonymousCredentials())
            else:
                _client = storage.Client()
        return _client


def iter_names(location: Location) -> Iterator[tuple[str, int]]:
    """(name, size) of every object under the prefix, listed a page at a time."""
    for blob in client().list_blobs(location.bucket, prefix=location.prefix, page_size=LIST_PAGE):
        yield blob.name, int(blob.size or 0)


def head(bucket: str, name: str, size: int = 1024) -> bytes:
    """The first `size` bytes: enough to tell a document by its content."""
    return client().bucket(bucket).blob(name).download_as_bytes(start=0, end=size - 1)


def read(bucket: str, name: str, *, max_bytes: int) -> bytes:
    blob = client().bucket(bucket).blob(name)
    blob.reload()
    if (blob.size or 0) > max_bytes:
        raise TooLarge(f"gs://{bucket}/{name} is {blob.size} bytes; at most {max_bytes} are accepted.")
    return blob.download_as_bytes()


def exists(bucket: str, name: str) -> bool:
    return client().bucket(bucket).blob(name).exists()


def write(bucket: str, name: str, data: bytes, content_type: str) -> None:
    client().bucket(bucket).blob(name).upload_from_string(data, content_type=content_type)
