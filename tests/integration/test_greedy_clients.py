"""A few slow sockets, long-polls or greedy keys cannot silence the API for everyone else."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import requests

from harness.docs import text_image
from harness.stack import poll_job, wait_until

pytestmark = pytest.mark.slow


def connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=10)


def slow_headers(url: str, n: int) -> list[socket.socket]:
    """Sockets that start a request and never finish its headers."""
    socks = []
    for i in range(n):
        s = connect(url)
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ".encode())
        socks.append(s)
    return socks


def long_polls(url: str, job_id: str, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = connect(url)
        s.sendall(f"GET /v1/jobs/{job_id}?wait=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
    return socks


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response: its headers and its body may arrive in separate segments."""
    data = b""

    def more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            pytest.fail(f"the server closed the connection after {data!r}")
        return chunk

    while b"\r\n\r\n" not in data:
        data += more()
    head = data.split(b"\r\n\r\n", 1)[0]
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(data) < len(head) + 4 + length:
        data += more()
    return data


def noise_png(size: int) -> bytes:
    """A real PNG of about `size` bytes (noise does not compress)."""
    import io
    import random

    from PIL import Image

    side = int((size / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), random.Random(1).randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_slow_sockets_and_long_polls_do_not_starve_the_api(stack):
    url = stack.api(workers=2, GNOSIS_HEADER_TIMEOUT="10")  # the default: the slow sockets stay for the probes
    queued = requests.post(f"{url}/v1/jobs", files={"file": ("q.png", text_image(["held"]))}).json()
    held = slow_headers(url, 200) + long_polls(url, queued["id"], 200)
    try:
        document = noise_png(100_000)
        health, submits = [], []
        for i in range(20):
            started = time.monotonic()
            assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
            health.append(time.monotonic() - started)
            started = time.monotonic()
            r = requests.post(f"{url}/v1/jobs", files={"file": (f"p{i}.png", document)}, timeout=5)
            assert r.status_code == 202, r.text
            submits.append(time.monotonic() - started)
        print(f"\nwith 200 slow-header sockets and 200 long-polls open: /healthz max {max(health) * 1000:.0f} ms, "
              f"100 KB POST max {max(submits) * 1000:.0f} ms")

        # The long-polls still work: a worker finishes the job and a waiting client hears at once.
        stack.worker()
        assert poll_job(url, queued["id"], timeout=60)["status"] == "succeeded"
        waiting = held[200]
        waiting.settimeout(30)
        assert b'"status":"succeeded"' in read_response(waiting)
    finally:
        for s in held:
            s.close()


def test_a_client_that_trickles_its_headers_is_dropped(stack):
    url = stack.api(GNOSIS_HEADER_TIMEOUT="2")
    s = slow_headers(url, 1)[0]
    started = time.monotonic()
    closed = threading.Event()

    def trickle():
        try:
            while not closed.wait(0.5):  # the attacker's pace: a byte every half second
                s.sendall(b"a")
        except OSError:
            closed.set()

    threading.Thread(target=trickle, daemon=True).start()
    wait_until(closed.is_set, timeout=20, message="the server to drop the trickling client")
    assert time.monotonic() - started < 15


def test_one_key_cannot_fill_the_queue_and_a_small_key_does_not_wait_behind_it(stack):
    stack.env["GNOSIS_API_KEYS"] = "big-key,small-key"
    url = stack.api(GNOSIS_MAX_KEY_PAGES="40")
    big, small = {"Authorization": "Bearer big-key"}, {"Authorization": "Bearer small-key"}

    def submit(headers: dict, name: str) -> requests.Response:
        return requests.post(f"{url}/v1/jobs", files={"file": (name, text_image([name]))}, headers=headers)

    big_jobs = [submit(big, f"big{i}.png").json()["id"] for i in range(40)]
    refused = submit(big, "big-too-many.png")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "key_queue_full"
    assert int(refused.headers["Retry-After"]) > 0
    mine = submit(small, "small.png")
    assert mine.status_code == 202  # the other key is unaffected by the big key's bound

    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="0.2")

    def small_done():
        job = requests.get(f"{url}/v1/jobs/{mine.json()['id']}", params={"wait": 5}, headers=small).json()
        return job["status"] == "succeeded" and job

    wait_until(small_done, timeout=60, message="the small key's job")
    statuses = [requests.get(f"{url}/v1/jobs/{j}", headers=big).json()["status"] for j in big_jobs]
    print(f"\nsmall key's job done with {statuses.count('queued')} of the big key's 40 jobs still queued")
    assert statuses.count("queued") >= 20  # it went ahead of most of the big key's backlog
    for j in big_jobs:  # and the backlog still drains
        wait_until(lambda: requests.get(f"{url}/v1/jobs/{j}", params={"wait": 5}, headers=big).json()["status"]
                   == "succeeded", timeout=60, message="the big key's backlog")
    assert int(stack.redis.get("gnosis:owner:" + "" + stack.redis.hget(f"gnosis:job:{big_jobs[0]}", "owner")
                               .decode() + ":pages") or 0) == 0
