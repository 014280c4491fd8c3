"""The API under greedy clients, gevent workers (the default) against gthread, in one run.

  python -m bench.api_pressure            # both worker classes; about 2 minutes

1. Latency of `GET /healthz` and a 100 KB `POST /v1/jobs` from a polite client, alone and while 200
   sockets send their headers slowly and 200 long-polls wait on a queued job.
2. API memory (RSS of the gunicorn processes) while 12 clients upload a 42 MB PNG each at once:
   growth over idle, against the bytes in flight.
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import requests
from PIL import Image

from bench.common import Stack, percentile, report

PROBES = 20


def noise_png(size: int) -> bytes:
    side = int((size / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), random.Random(size).randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _open(url: str, request: bytes) -> socket.socket | None:
    parsed = urlparse(url)
    try:
        s = socket.create_connection((parsed.hostname, parsed.port), timeout=5)
        s.sendall(request)
        return s
    except OSError:
        return None


def probe(url: str, document: bytes) -> tuple[list[float], list[float], int]:
    health, submit, failures = [], [], 0
    for i in range(PROBES):
        for target, out in (("health", health), ("submit", submit)):
            started = time.monotonic()
            try:
                if target == "health":
                    ok = requests.get(f"{url}/healthz", timeout=5).status_code == 200
                else:
                    ok = requests.post(f"{url}/v1/jobs", files={"file": (f"p{i}.png", document)},
                                       timeout=5).status_code == 202
            except requests.RequestException:
                ok = False
            out.append(time.monotonic() - started)
            failures += not ok
    return health, submit, failures


def pressure(url: str, job_id: str) -> list[socket.socket]:
    held = [_open(url, f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ".encode()) for i in range(200)]
    held += [_open(url, f"GET /v1/jobs/{job_id}?wait=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode()) for _ in range(200)]
    return [s for s in held if s is not None]


def api_rss(api_pid: int) -> int:
    """Resident bytes of the API's gunicorn master and its workers."""
    total = 0
    for pid in [api_pid, *_children(api_pid)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def uploads(url: str, api_pid: int, document: bytes, clients: int) -> tuple[int, int, int]:
    idle = api_rss(api_pid)
    peak = idle
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, api_rss(api_pid))
            time.sleep(0.02)  # sampling period

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    statuses = []

    def send():
        r = requests.post(f"{url}/v1/jobs", files={"file": ("big.png", document)}, timeout=300)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    return idle, peak, sum(s == 202 for s in statuses)


def run(worker_class: str, tmp: Path, redis_url: str) -> dict:
    (tmp / worker_class).mkdir()
    stack = Stack(tmp / worker_class, redis_url)
    stack.redis.flushdb()
    try:
        url = stack.api(workers=2, GNOSIS_API_WORKER_CLASS=worker_class, GNOSIS_MAX_UPLOAD_BYTES=str(50 * 2**20),
                        GNOSIS_MAX_PIXELS="100000000", GNOSIS_MAX_QUEUED_BYTES=str(8 * 2**30))
        small = noise_png(100_000)
        quiet_health, quiet_submit, quiet_fail = probe(url, small)
        job = requests.post(f"{url}/v1/jobs", files={"file": ("held.png", small)}).json()
        held = pressure(url, job["id"])
        try:
            busy_health, busy_submit, busy_fail = probe(url, small)
        finally:
            for s in held:
                s.close()
        big = noise_png(42 * 2**20)
        idle, peak, accepted = uploads(url, stack.procs[-1].pid, big, 12)
        ms = lambda values, q: round(percentile(values, q) * 1000, 1)  # noqa: E731
        return {
            "worker_class": worker_class,
            "quiet_health_p99_ms": ms(quiet_health, 99), "quiet_submit_p99_ms": ms(quiet_submit, 99),
            "pressure_health_p50_ms": ms(busy_health, 50), "pressure_health_p99_ms": ms(busy_health, 99),
            "pressure_submit_p50_ms": ms(busy_submit, 50), "pressure_submit_p99_ms": ms(busy_submit, 99),
            "failed_probes": quiet_fail + busy_fail, "held_sockets": len(held),
            "upload_bytes_in_flight": 12 * len(big), "uploads_accepted": accepted,
            "rss_idle_mib": round(idle / 2**20), "rss_peak_mib": round(peak / 2**20),
            "rss_growth_per_byte_in_flight": round((peak - idle) / (12 * len(big)), 2),
        }
    finally:
        stack.stop()
        stack.redis.flushdb()


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--classes", default="gevent,gthread")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gnosis-bench-"))
    results = [run(c, tmp, args.redis) for c in args.classes.split(",")]
    keys = [k for k in results[0] if k != "worker_class"]
    table = [["measure", *[r["worker_class"] for r in results]]] + [[k, *[r[k] for r in results]] for k in keys]
    report("api_pressure", {"results": results}, table)


if __name__ == "__main__":
    main()
