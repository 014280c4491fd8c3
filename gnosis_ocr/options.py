"""A job's options: which pages (`pages`, "1-3,7") and, for the CPU engine, which language (`language`,
Tesseract's codes joined by "+"). Parsed and checked where the job is submitted, stored with its record
and read back by the worker with the page claim."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from . import keys
from .errors import BadRequest, UnreadableDocument

_RANGE = re.compile(r"^\s*(\d{1,6})\s*(?:-\s*(\d{1,6})\s*)?$")
_LANGUAGE = re.compile(r"^[A-Za-z0-9_]{1,32}(\+[A-Za-z0-9_]{1,32}){0,7}$")

LANGUAGES_TTL = 15.0
"""Seconds the API trusts the languages its workers last reported."""


@dataclass(frozen=True)
class Options:
    pages: str | None = None  # as the caller wrote it, for the result
    page_map: tuple[int, ...] = ()  # 0-based document pages, in order; empty: every page
    language: str | None = None
    source: str | None = None  # gs://bucket/object of a batch's document: workers read it from there

    def to_record(self) -> str:
        """The record's `options` field ('' when there are none)."""
        if not (self.pages or self.language or self.source):
            return ""
        return json.dumps({"pages": self.pages, "page_map": list(self.page_map), "language": self.language,
                           "source": self.source})

    @classmethod
    def from_record(cls, raw: str | bytes | None) -> Options:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(pages=data.get("pages"), page_map=tuple(data.get("page_map") or ()), language=data.get("language"),
                   source=data.get("source"))

    def to_api(self) -> dict:
        return {"pages": self.pages, "language": self.language}

    def document_page(self, index: int) -> int:
        """The document's page (0-based) that the job's page `index` is."""
        return self.page_map[index] if self.page_map else index


def parse_pages(text: str) -> list[int]:
    """`"1-3,7"` as sorted 1-based page numbers; BadRequest (`invalid_parameter`) if malformed."""
    pages: set[int] = set()
    for part in text.split(","):
        match = _RANGE.match(part)
        if not match:
            raise BadRequest(f"pages {text!r} is not a list of pages and ranges such as \"1-3,7\".",
                             code="invalid_parameter")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first < 1 or last < first:
            raise BadRequest(f"pages {text!r}: {part.strip()!r} is not a range of pages counted from 1.",
                             code="invalid_parameter")
        if last - first > 100_000:
            raise BadRequest(f"pages {text!r}: {part.strip()!r} is too long a range.", code="invalid_parameter")
        pages.update(range(first, last + 1))
    return sorted(pages)


def select(pages: list[int], total: int) -> tuple[int, ...]:
    """The 0-based document pages chosen; 422 (`page_out_of_range`) for a page the document lacks."""
    beyond = [p for p in pages if p > total]
    if beyond:
        raise UnreadableDocument(f"The document has {total} page(s); page {beyond[0]} does not exist.",
                                 code="page_out_of_range")
    return tuple(p - 1 for p in pages)


def check_language(language: str, installed: set[str] | None) -> str:
    """`language` if well formed and, where the workers' languages are known, installed on them."""
    if not _LANGUAGE.match(language):
        raise BadRequest(f"language {language!r} is not Tesseract codes joined by '+', such as \"deu+eng\".",
                         code="invalid_parameter")
    if installed is not None:
        missing = [code for code in language.split("+") if code not in installed]
        if missing:
            raise BadRequest(f"language {'+'.join(missing)} is not installed; installed: "
                             f"{', '.join(sorted(installed)) or 'none'}.", code="unsupported_language")
    return language


class WorkerLanguages:
    """The languages the live workers' engines read (from their heartbeat records), cached briefly:
    None while no worker has said (none running yet, or only engines that need no language)."""

    def __init__(self, client) -> None:
        self.redis = client
        self._cached: tuple[float, set[str] | None] | None = None

    def get(self) -> set[str] | None:
        if self._cached is not None and time.monotonic() - self._cached[0] < LANGUAGES_TTL:
            return self._cached[1]
        found: set[str] | None = None
        for key in self.redis.scan_iter(keys.WORKER_RECORDS, count=1000):
            if not keys.is_worker_record(key):
                continue
            try:
                record = json.loads(self.redis.get(key) or b"{}")
            except ValueError:
                continue
            if isinstance(record.get("languages"), list):
                found = (found or set()) | set(record["languages"])
        self._cached = (time.monotonic(), found)
        return found
