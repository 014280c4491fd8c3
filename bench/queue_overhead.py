"""Queue overhead: submit -> final state of a job with the `null` engine (long-polling, no sleep loop),
against a bare Celery round trip (`noop.delay().get()`) on the same Redis with the same number of
worker processes, at 1 and 50 concurrent clients. Goal: p50 ratio <= 1.5 at both.

    python bench/queue_overhead.py [--requests 200] [--processes 2]
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from PIL import Image

from bench.common import percentile, private_stack, report, wait_until


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    return buf.getvalue()


def run_clients(n_clients: int, n_requests: int, one) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(count: int) -> None:
        state = threading.local()
        for _ in range(count):
            started = time.perf_counter()
            one(state)
            with lock:
                latencies.append(time.perf_counter() - started)

    per_client = max(1, n_requests // n_clients)
    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(client, [per_client] * n_clients))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()

    stack, redis_proc = private_stack()
    try:
        stack.env.update(OCR_ENGINE="null")
        url = stack.api(workers=2, threads=16)
        worker = stack.spawn("worker", ["worker", f"--concurrency={args.processes}", "--loglevel=WARNING"])
        stack.wait_worker_ready(worker)
        bare = stack.procs.append(_bare_worker(stack, args.processes)) or stack.procs[-1]
        sys.path.insert(0, str(stack.tmp))
        import os

        os.environ["REDIS_URL"] = stack.redis_url
        from bench.bare_celery import noop

        wait_until(lambda: _ping(noop), timeout=60, message="the bare Celery worker")
        png = tiny_png()

        def gnosis(state) -> None:
            session = getattr(state, "session", None) or requests.Session()
            state.session = session
            job = session.post(f"{url}/v1/jobs", files={"file": ("p.png", png)}).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                job = session.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30}).json()
            assert job["status"] == "succeeded", job

        def celery(state) -> None:
            noop.delay().get(timeout=60)

        rows = [["clients", "system", "p50 ms", "p99 ms", "n"]]
        result = {"processes": args.processes}
        for clients in (1, 50):
            n = args.requests if clients == 1 else args.requests * 5
            run_clients(clients, min(n, 50), gnosis)  # warm-up: connections, imports, caches
            run_clients(clients, min(n, 50), celery)
            ours = run_clients(clients, n, gnosis)
            base = run_clients(clients, n, celery)
            for name, values in (("gnosis-ocr", ours), ("bare celery", base)):
                rows.append([clients, name, round(percentile(values, 50) * 1000, 1),
                             round(percentile(values, 99) * 1000, 1), len(values)])
            result[f"c{clients}"] = {
                "gnosis_p50_ms": round(percentile(ours, 50) * 1000, 2),
                "gnosis_p99_ms": round(percentile(ours, 99) * 1000, 2),
                "celery_p50_ms": round(percentile(base, 50) * 1000, 2),
                "celery_p99_ms": round(percentile(base, 99) * 1000, 2),
                "p50_ratio": round(percentile(ours, 50) / percentile(base, 50), 2),
                "p99_ratio": round(percentile(ours, 99) / percentile(base, 99), 2),
            }
            rows.append([clients, "ratio", result[f"c{clients}"]["p50_ratio"], result[f"c{clients}"]["p99_ratio"], ""])
        report("queue_overhead", result, rows)
        del bare
    finally:
        stack.stop()
        redis_proc.stop()


def _bare_worker(stack, processes: int):
    from harness.stack import Proc

    return Proc([sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker", f"--concurrency={processes}",
                 "--loglevel=WARNING", "--without-mingle", "--without-gossip", "-O", "fair", "-Q", "bare"],
                stack.env, stack.tmp / "bare-worker.log")


def _ping(noop) -> bool:
    try:
        noop.delay().get(timeout=5)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
