"""Objects in Google Cloud Storage for batches: `gs://bucket/prefix` URIs, the allow-list, listing,
ranged and bounded reads pinned to a generation, writes. Through google-cloud-storage, which honours
STORAGE_EMULATOR_HOST (fake-gcs-server in the tests)."""

from __future__ import annotations

import io
import os
import posixpath
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from .errors import BadRequest, Forbidden, TooLarge

LIST_PAGE = 1000
"""Objects asked for per listing call: a huge prefix is read a page at a time, never held whole."""

RANGE_BYTES = 64 * 1024
"""Bytes per ranged read of a large object (see WHOLE_BELOW): pdfium reads a PDF's trailer,
cross-reference table and page tree in pieces of a few KiB, here and there in the file."""
WHOLE_BELOW = 8 * 1024 * 1024
"""Objects up to this size are read in one request: at a bucket's tens of milliseconds per request
and hundreds of MB/s, a few ranged reads cost more time than the whole object."""

FETCH_THREADS = 8
"""Blocks of one object downloaded at once by RangedReader.fetch."""
READ_AHEAD_ROUNDS = 8
"""Passes of RangedReader.fetch_ahead before it downloads the object whole."""

REQUEST_TIMEOUT = 60.0
"""Seconds one HTTP request to the bucket may wait for an answer (the storage client's own default)."""

T = TypeVar("T")

_clients: dict[str | None, object] = {}
_lock = threading.Lock()
_deadline = 120.0  # the storage client's own, until the worker's settings say otherwise (configure)


def configure(*, timeout: float) -> None:
    """Every bucket call gives up after `timeout` seconds, its retries included (GNOSIS_BUCKET_TIMEOUT):
    a bucket that fails for minutes must hand the listing or page back long before a page's time
    limit, and must let a stopping worker leave."""
    global _deadline
    _deadline = float(timeout)


def _policy() -> dict:
    """The retry and timeout arguments of one bucket call: the storage client's retry (5xx, 429, 408,
    connection errors, with back-off), cut at the configured deadline."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return {"retry": DEFAULT_RETRY.with_timeout(_deadline), "timeout": min(REQUEST_TIMEOUT, _deadline)}


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


def transient(exc: BaseException) -> bool:
    """Whether a bucket call's error is worth trying again later: the service failing, throttling or out
    of reach (google-cloud-storage has already retried it, for up to GNOSIS_BUCKET_TIMEOUT), not a missing object,
    a refusal or a bad request, which would fail the same way again."""
    import requests
    from google.api_core import exceptions as api
    from google.auth.exceptions import TransportError

    if isinstance(exc, api.ClientError):  # 4xx: the request is at fault, but for throttling and timeouts
        return isinstance(exc, api.TooManyRequests) or exc.code == 408
    return isinstance(exc, (api.GoogleAPICallError, api.RetryError, requests.ConnectionError, requests.Timeout,
                            TransportError, ConnectionError, TimeoutError))


def client():
    """One client per process and endpoint (STORAGE_EMULATOR_HOST names an emulator's)."""
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
    with _lock:
        if endpoint not in _clients:
            from google.cloud import storage

            if endpoint:
                from google.auth.credentials import AnonymousCredentials

                _clients[endpoint] = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "gnosis"),
                                                    credentials=AnonymousCredentials())
            else:
                _clients[endpoint] = storage.Client()
        return _clients[endpoint]


def iter_names(location: Location) -> Iterator[tuple[str, int]]:
    """(name, size) of every object under the prefix, listed a page at a time."""
    for blob in client().list_blobs(location.bucket, prefix=location.prefix, page_size=LIST_PAGE, **_policy()):
        yield blob.name, int(blob.size or 0)


def head(bucket: str, name: str, size: int = 1024) -> bytes:
    """The first `size` bytes: enough to tell a document by its content."""
    return client().bucket(bucket).blob(name).download_as_bytes(start=0, end=size - 1, **_policy())


class _Unfetched(Exception):
    """A block a read-ahead pass needed and did not have (RangedReader.fetch_ahead)."""


class RangedReader(io.RawIOBase):
    """An object read in blocks as it is sought and read, each block fetched once, every one from the
    generation that was opened (a replaced object raises NotFound rather than mixing two documents):
    counting a PDF's pages reads its trailer, cross-reference table and page tree, not the content
    and images that make up most of its bytes."""

    def __init__(self, blob, *, block: int) -> None:
        super().__init__()
        self.size, self.generation = int(blob.size or 0), blob.generation
        self._blob = blob.bucket.blob(blob.name, generation=blob.generation)
        self._block = max(block, 1)
        self._blocks: dict[int, bytes] = {}
        self._missing: set[int] | None = None
        """During a read-ahead pass, the blocks it wanted and did not have; None: fetch them as read."""
        self._position = 0
        self.fetched = 0
        """Bytes downloaded so far."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(base + offset, 0)
        return self._position

    @property
    def incomplete(self) -> bool:
        """Whether a read of this read-ahead pass fell short for want of a block: what was read from
        it is not to be trusted, and a reader may carry on only to learn what else it needs."""
        return bool(self._missing)

    def block(self, index: int) -> bytes:
        """Block `index` of the object, downloaded on first use."""
        data = self._blocks.get(index)
        if data is None:
            if self._missing is not None:
                self._missing.add(index)
                raise _Unfetched(index)
            data = self._blocks[index] = self._download(index)
            self.fetched += len(data)
        return data

    def _download(self, index: int) -> bytes:
        start = index * self._block
        # A blob of its own per request: fetch_ahead downloads blocks on several threads at once.
        blob = self._blob.bucket.blob(self._blob.name, generation=self.generation)
        return blob.download_as_bytes(start=start, end=min(start + self._block, self.size) - 1, **_policy())

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        end, done = min(self._position + len(view), self.size), 0
        while self._position < end:
            index, offset = divmod(self._position, self._block)
            try:
                data = self.block(index)
            except _Unfetched:
                break  # a short read: pdfium, PIL and the rest take it for a failed read
            piece = data[offset:offset + end - self._position]
            if not piece:
                break  # shorter than its metadata said
            view[done:done + len(piece)] = piece
            done += len(piece)
            self._position += len(piece)
        return done

    def fetch(self, indices: Iterable[int]) -> None:
        """Download these blocks now, at once (each its own request), where not downloaded already."""
        wanted = sorted({i for i in indices if i not in self._blocks and 0 <= i * self._block < self.size})
        if len(wanted) == 1:
            self._blocks[wanted[0]] = data = self._download(wanted[0])
            self.fetched += len(data)
        elif wanted:
            with ThreadPoolExecutor(max_workers=min(len(wanted), FETCH_THREADS)) as pool:
                for index, data in zip(wanted, pool.map(self._download, wanted), strict=True):
                    self._blocks[index] = data
                    self.fetched += len(data)

    def fetch_ahead(self, use: Callable[[RangedReader], T], *, rounds: int = READ_AHEAD_ROUNDS) -> T:
        """`use(self)`, each block it reads downloaded before the call rather than during it. A PDF is
        counted under the process's one pdfium lock: fetched as pdfium asks, every ranged read of a
        large PDF would be a round trip inside it, one document at a time. So `use` runs on what is
        here; the blocks it lacked are fetched together, outside it, and it runs again, until it lacks
        none. A file that keeps asking for more (an xref being rebuilt by a scan of the whole file) is
        downloaded whole after `rounds`."""
        for _ in range(rounds):
            self._missing = set()
            try:
                result = use(self)
            except Exception:
                if not self._missing:
                    raise
            else:
                if not self._missing:
                    return result
            finally:
                missing, self._missing = self._missing, None
            self.fetch(missing)
        self._fetch_whole()
        return use(self)

    def _fetch_whole(self) -> None:
        """The object in one request, as blocks: what else a reader wants is then here already."""
        blob = self._blob.bucket.blob(self._blob.name, generation=self.generation)
        data = blob.download_as_bytes(**_policy())
        self._blocks = {i: data[start:start + self._block] for i, start in enumerate(range(0, len(data), self._block))}
        self.fetched += len(data)


def open_ranged(bucket: str, name: str, *, max_bytes: int, whole_below: int = WHOLE_BELOW) -> RangedReader:
    """The object as a seekable binary file that downloads only what is read, in RANGE_BYTES blocks (in
    one request up to `whole_below` bytes); TooLarge past `max_bytes`, as for uploads."""
    blob = client().bucket(bucket).blob(name)
    blob.reload(**_policy())
    size = int(blob.size or 0)
    if size > max_bytes:
        raise TooLarge(f"gs://{bucket}/{name} is {size} bytes; at most {max_bytes} are accepted.")
    reader = RangedReader(blob, block=size if size <= whole_below else RANGE_BYTES)
    if size > 0:
        # Now, in the caller's thread: the whole of a small object; a large one's first and last
        # blocks, which every reader wants (a PDF's header and trailer). See fetch_ahead for why.
        reader.fetch({0, (size - 1) // reader._block})
    return reader


def read(uri: str, *, max_bytes: int) -> bytes:
    """The whole object at `uri`, `gs://bucket/name` or `gs://bucket/name#generation` (that generation
    or NotFound); TooLarge past `max_bytes`."""
    path, _, generation = uri[len("gs://"):].partition("#")
    bucket, _, name = path.partition("/")
    pinned = int(generation) if generation else None
    blob = client().bucket(bucket).blob(name, generation=pinned)
    blob.reload(**_policy())
    if (blob.size or 0) > max_bytes:
        raise TooLarge(f"{uri} is {blob.size} bytes; at most {max_bytes} are accepted.")
    # Downloaded through a blob that was never reloaded: a reloaded one downloads from the mediaLink the
    # server sent, which need not name the generation (fake-gcs-server's does not), and would then
    # read whatever is live, a replacement included.
    return client().bucket(bucket).blob(name, generation=blob.generation).download_as_bytes(**_policy())


def metadata(bucket: str, name: str) -> dict[str, str] | None:
    """An object's custom metadata ({} if it has none), or None if there is no such object: one call,
    as an existence check is."""
    from google.api_core.exceptions import NotFound

    blob = client().bucket(bucket).blob(name)
    try:
        blob.reload(**_policy())
    except NotFound:
        return None
    return dict(blob.metadata or {})


def write(bucket: str, name: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> None:
    blob = client().bucket(bucket).blob(name)
    if metadata:
        blob.metadata = metadata
    blob.upload_from_string(data, content_type=content_type, **_policy())
