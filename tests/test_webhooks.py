"""Webhooks: a signed POST of the final job object, retried with backoff, never to private addresses
unless allowed. The receiver is a real HTTP server on loopback (allowed explicitly for the test)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from gnosis_ocr import webhook
from tests.conftest import poll_job, wait_until
from tests.docs import text_image

SECRET = "whsec-test"


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                status = 503 if len(receiver.calls) <= receiver.fail_first else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver(fail_first=2)
    yield r
    r.stop()


def hooks_env(stack) -> None:
    stack.env.update(GNOSIS_WEBHOOK_SECRET=SECRET, GNOSIS_WEBHOOK_ALLOW_PRIVATE="true",
                     GNOSIS_WEBHOOK_BACKOFF="0.2")


def test_final_job_is_posted_signed_and_retried(stack, receiver):
    hooks_env(stack)
    url = stack.api()
    stack.worker()
    r = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["hooked page"]))},
                      data={"callback_url": receiver.url})
    assert r.status_code == 202 and r.json()["callback_url"] == receiver.url
    job_id = r.json()["id"]
    assert poll_job(url, job_id)["status"] == "succeeded"
    wait_until(lambda: len(receiver.calls) == 3, timeout=30, message="two failures then a delivery")
    for headers, body in receiver.calls:
        assert webhook.verify(SECRET, headers["X-Gnosis-Signature"], body)
        assert headers["X-Gnosis-Event"] == "job.succeeded"
        payload = json.loads(body)
        assert payload["id"] == job_id and payload["status"] == "succeeded" and payload["pages_done"] == 1
    assert not webhook.verify("wrong-secret", receiver.calls[-1][0]["X-Gnosis-Signature"], receiver.calls[-1][1])
    record = stack.redis.hgetall(f"gnosis:job:{job_id}")
    assert record[b"webhook_status"] == b"delivered:204" and record[b"webhook_attempts"] == b"3"


def test_cancel_is_posted_too(stack):
    hooks_env(stack)
    hook = Receiver()
    try:
        url = stack.api()
        job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["x"]))},
                            data={"callback_url": hook.url}).json()
        requests.post(f"{url}/v1/jobs/{job['id']}/cancel")
        stack.worker()
        wait_until(lambda: hook.calls, timeout=30, message="the cancel webhook")
        assert json.loads(hook.calls[0][1])["status"] == "cancelled"
    finally:
        hook.stop()


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://192.168.0.10/x",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/hook", "ftp://example.com/x", "not a url",
    "http://user:pw@example.com/x", "",
])
def test_callbacks_to_private_addresses_are_refused(stack, target):
    stack.env.update(GNOSIS_WEBHOOK_SECRET=SECRET)
    url = stack.api()
    r = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["x"]))}, data={"callback_url": target})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_callback_url"


def test_callbacks_need_a_secret(stack):
    url = stack.api()
    r = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["x"]))},
                      data={"callback_url": "https://example.com/hook"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "webhooks_disabled"
