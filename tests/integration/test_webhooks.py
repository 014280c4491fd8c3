"""Webhooks: a signed POST of the final job object, retried with backoff, never to private addresses
unless allowed. The receiver is a real HTTP server on loopback (allowed explicitly for the test)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from gnosis_ocr import webhook
from harness.docs import text_image
from harness.stack import poll_job, wait_until
from harness.webhooks import Receiver  # noqa: F401 (the other tests take it from here too)

SECRET = "whsec-test"


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
    # One event, one id on every retry: receivers drop the repeats.
    assert len({headers["X-Gnosis-Delivery"] for headers, _ in receiver.calls}) == 1
    for headers, body in receiver.calls:
        assert webhook.verify(SECRET, headers["X-Gnosis-Signature"], body)
        assert headers["X-Gnosis-Event"] == "job.succeeded"
        payload = json.loads(body)
        assert payload["id"] == job_id and payload["status"] == "succeeded" and payload["pages_done"] == 1
    assert not webhook.verify("wrong-secret", receiver.calls[-1][0]["X-Gnosis-Signature"], receiver.calls[-1][1])
    # The receiver saw the third call before its answer reached the worker, which then records it.
    record = wait_until(lambda: (h := stack.redis.hgetall(f"gnosis:job:{job_id}")).get(b"webhook_status", b"")
                        .startswith(b"delivered") and h, timeout=30, message="the delivery to be recorded")
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
    # IPv6 forms that carry a private IPv4 address, and empty credentials:
    "http://[::127.0.0.1]/hook", "http://[::ffff:10.0.0.1]/hook", "http://[2002:7f00:1::]/hook",
    "http://[64:ff9b::7f00:1]/hook", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/hook", "http://:@example.com/x",
])
def test_callbacks_to_private_addresses_are_refused(stack, target):
    stack.env.update(GNOSIS_WEBHOOK_SECRET=SECRET)
    url = stack.api()
    r = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["x"]))}, data={"callback_url": target})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_callback_url"


@pytest.mark.parametrize("target", [
    # Local-use NAT64 (RFC 8215) and IPv4-translated (SIIT) forms of link-local and loopback addresses.
    "http://[64:ff9b:1::a9fe:a9fe]/hook", "http://[64:ff9b:1::7f00:1]/hook",
    "http://[::ffff:0:a9fe:a9fe]/hook", "http://[::ffff:0:7f00:1]/hook",
])
def test_translated_ipv6_forms_of_private_addresses_are_refused(target):
    from gnosis_ocr.errors import BadRequest
    from gnosis_ocr.webhook import check_url

    with pytest.raises(BadRequest, match="loopback, private or reserved"):
        check_url(target, allow_private=False)


def test_callbacks_need_a_secret(stack):
    url = stack.api()
    r = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["x"]))},
                      data={"callback_url": "https://example.com/hook"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "webhooks_disabled"


def test_delivery_connects_to_the_address_it_checked(monkeypatch):
    """DNS rebinding: the name resolves to a public address when checked and to loopback a moment later.
    A resolver that changes its answer cannot run here without a DNS server, so getaddrinfo is replaced."""
    import socket

    inside = Receiver()
    answers = iter(["192.0.2.10", "127.0.0.1"])  # TEST-NET-1 (public enough for the check), then loopback
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "hooks.example.com":
            address = next(answers, "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    dialled: list[str] = []
    connect = socket.create_connection

    def no_traffic_off_this_machine(address, *args, **kwargs):
        dialled.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError("test: nothing is sent beyond loopback")
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket, "create_connection", no_traffic_off_this_machine)
    monkeypatch.setattr(webhook, "is_public", lambda address: str(address) != "127.0.0.1")
    port = inside.server.server_address[1]
    try:
        with pytest.raises(webhook.DeliveryFailed):
            webhook.deliver(f"http://hooks.example.com:{port}/hook", {"id": "j", "status": "succeeded"},
                            secret=SECRET, allow_private=False, timeout=2)
        assert dialled == ["192.0.2.10"]  # the address that was checked, not the one the name moved to
        assert inside.calls == []  # the loopback receiver was never reached
    finally:
        inside.stop()


class Trickler:
    """A receiver that reads the request, then answers one byte a second: it never finishes in time."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow"
        self.connections = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn) -> None:
        with conn:
            try:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    if self.stopped.wait(1.0):  # the slow answer is the fault under test
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


def test_slow_receivers_delay_only_themselves(stack):
    slow, healthy = Trickler(), Receiver()
    try:
        hooks_env(stack)
        stack.env.update(GNOSIS_WEBHOOK_TIMEOUT="3", GNOSIS_WEBHOOK_MAX_ATTEMPTS="1")
        url = stack.api()
        stack.worker(OCR_ENGINE="null")
        slow_jobs = [requests.post(f"{url}/v1/jobs", files={"file": (f"s{n}.png", text_image([f"slow {n}"]))},
                                   data={"callback_url": slow.url}).json() for n in range(10)]
        wait_until(lambda: slow.connections >= 4, timeout=30, message="the slow receivers to hold deliveries")
        submitted = time.monotonic()
        job = requests.post(f"{url}/v1/jobs", files={"file": ("ok.png", text_image(["healthy"]))},
                            data={"callback_url": healthy.url}).json()
        wait_until(lambda: healthy.calls, timeout=20, message="the healthy receiver's webhook")
        print(f"\nhealthy webhook delivered {time.monotonic() - submitted:.1f}s after submit, "
              f"beside {slow.connections} slow deliveries")
        assert json.loads(healthy.calls[0][1])["id"] == job["id"]
        # Each slow delivery is given up at its deadline (3 s), long before its answer would end.
        from gnosis_ocr import keys

        def given_up(job_id: str) -> bool:
            return stack.redis.hget(keys.job(job_id), "webhook_status") == b"failed"

        for j in slow_jobs:
            wait_until(lambda j=j: given_up(j["id"]), timeout=60, message="a slow delivery to be given up")
    finally:
        slow.stop()
        healthy.stop()


def test_a_redirect_is_a_failure_and_is_not_followed(monkeypatch):

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(webhook.DeliveryRejected, match="307"):
            webhook.deliver(f"http://127.0.0.1:{server.server_address[1]}/hook", {"id": "j", "status": "succeeded"},
                            secret=SECRET, allow_private=True, timeout=2)
    finally:
        server.shutdown()
        server.server_close()
