"""A small Python client for the HTTP API; the `submit` command is built on it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import requests

from .errors import GnosisError


class ApiError(GnosisError):
    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None,
                 status: int = 0) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.status = status


class Client:
    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 60) -> None:
        self.base_url = (base_url or os.environ.get("GNOSIS_URL", "http://127.0.0.1:8080")).rstrip("/")
        self.session = requests.Session()
        key = api_key or os.environ.get("GNOSIS_API_KEY")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
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

    def submit(self, path: str | Path, *, idempotency_key: str | None = None) -> dict:
        path = Path(path)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with path.open("rb") as f:
            return self._request("POST", "/v1/jobs", files={"file": (path.name, f)}, headers=headers).json()

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
        self._request("DELETE", f"/v1/jobs/{job_id}")

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
