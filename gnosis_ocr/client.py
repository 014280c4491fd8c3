"""A small Python client for the HTTP API; the `submit` command is built on it."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import requests

from .errors import GnosisError


class ApiError(GnosisError):
    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None,
                 status: int = 0) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.status = status
        self.retried = False  # set by the client: an earlier try of the same call had no answer, or "not now"


RETRIED_STATUSES = (429, 502, 503, 504)
"""Answers that mean "not now" (busy, Redis restarting, a proxy between deploys): retried with back-off."""


class Client:
    """Every call is retried through connection errors and "not now" answers, with back-off (the
    server's Retry-After when it gives one) for up to `retries` tries. A submission always carries an
    Idempotency-Key (one is made when none is given), so a retry after a lost answer never makes a
    second job."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 60,
                 retries: int = 6, backoff: float = 0.5) -> None:
        self.base_url = (base_url or os.environ.get("GNOSIS_URL", "http://127.0.0.1:8080")).rstrip("/")
        self.session = requests.Session()
        key = api_key or os.environ.get("GNOSIS_API_KEY")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff = backoff

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        """The answer; ApiError otherwise, with `retried` set when an earlier try went unanswered or was refused
        for now (so a 404 may be that try's own doing)."""
        for attempt in range(1, self.retries + 1):
            last = attempt == self.retries
            try:
                return self._once(method, path, **kwargs)
            except requests.ConnectionError:
                if last:
                    raise
                delay = self.backoff * 2 ** (attempt - 1)
            except ApiError as exc:
                exc.retried = attempt > 1
                if last or exc.status not in RETRIED_STATUSES:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else self.backoff * 2 ** (attempt - 1)
            time.sleep(min(delay, 30.0))  # back-off between retries, as the server asked
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self.session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                code, message = err["code"], err["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", f"HTTP {response.status_code}"
            retry = response.headers.get("Retry-After")
            raise ApiError(message, code=code, status=response.status_code,
                           retry_after=int(retry) if retry and retry.isdigit() else None)
        return response

    def submit(self, path: str | Path, *, idempotency_key: str | None = None, pages: str | None = None,
               language: str | None = None, callback_url: str | None = None) -> dict:
        """Submit a document; `pages` ("1-3,7"), `language` ("deu+eng") and `callback_url` (a signed POST of
        the job once it is final) as the API takes them."""
        path = Path(path)
        headers = {"Idempotency-Key": idempotency_key or f"gnosis-client-{uuid.uuid4().hex}"}
        data = path.read_bytes()  # read once: every retry sends the same bytes
        form = {k: v for k, v in (("pages", pages), ("language", language), ("callback_url", callback_url))
                if v is not None}
        return self._request("POST", "/v1/jobs", files={"file": (path.name, data)}, data=form or None,
                             headers=headers).json()

    def job(self, job_id: str, *, wait: float = 0) -> dict:
        params = {"wait": wait} if wait else None
        return self._request("GET", f"/v1/jobs/{job_id}", params=params).json()

    def result(self, job_id: str, *, markdown: bool = False) -> dict | str:
        if markdown:
            return self._request("GET", f"/v1/jobs/{job_id}/result", params={"format": "markdown"}).text
        return self._request("GET", f"/v1/jobs/{job_id}/result").json()

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        try:
            self._request("DELETE", f"/v1/jobs/{job_id}")
        except ApiError as exc:
            # A 404 to a repeat is the earlier try done: its answer lost, or a 503 while replicas caught up.
            if exc.status != 404 or not exc.retried:
                raise

    def submit_batch(self, source: str, destination: str, *, idempotency_key: str | None = None, **fields) -> dict:
        """A batch from `source` to `destination` (gs:// prefixes); `fields`: pages, language, overwrite,
        callback_url. Retried with one Idempotency-Key, so a lost answer never lists the documents twice."""
        body = {"source": source, "destination": destination,
                **{k: v for k, v in fields.items() if v is not None}}
        headers = {"Idempotency-Key": idempotency_key or f"gnosis-client-{uuid.uuid4().hex}"}
        return self._request("POST", "/v1/batches", json=body, headers=headers).json()

    def batch(self, batch_id: str) -> dict:
        return self._request("GET", f"/v1/batches/{batch_id}").json()

    def batch_failures(self, batch_id: str) -> list[dict]:
        """Every failed document of the batch, following the API's pages."""
        out, path = [], f"/v1/batches/{batch_id}/documents?status=failed"
        while path:
            page = self._request("GET", path).json()
            out += page["documents"]
            path = page.get("next")
        return out

    def wait_batch(self, batch_id: str, *, timeout: float | None = None, interval: float = 1.0,
                   on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the batch is final (a batch has no long-poll: its documents end one by one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.batch(batch_id)
            if on_progress:
                on_progress(batch)
            if batch["status"] in ("succeeded", "failed", "cancelled"):
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                return batch
            time.sleep(interval)  # polling the API, which holds no batch long-poll

    def wait(self, job_id: str, *, timeout: float | None = None,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Long-poll until the job is final; `on_progress` sees every state returned on the way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            longest = 2.0 if on_progress else 10.0  # short long-polls keep a progress bar moving
            step = longest if deadline is None else max(0.0, min(longest, deadline - time.monotonic()))
            job = self.job(job_id, wait=step or 0)
            if on_progress:
                on_progress(job)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if deadline is not None and time.monotonic() >= deadline:
                return job
