"""What GNOSIS_ACCEPT_REPLICAS=1 costs a submission: POST /v1/jobs latency (a 100 KB PNG) and accepted
jobs per second, against the same API answering once the primary has the job, in the same run, on one
primary with one replica on loopback (AOF on both, appendfsync everysec, as a deployment would run).

    python -m bench.accept_replicas [--requests 300] [--clients 1,16]

A loopback replica acknowledges in well under a millisecond; across zones add the round trip.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests

from bench.common import PrivateRedis, Stack, percentile, report, wait_until
from bench.submit_throughput import image_100kb

AOF = ["--appendfsync", "everysec"]


def submit_all(url: str, clients: int, total: int, png: bytes) -> tuple[list[float], float]:
    """`total` submissions over `clients` threads: each one's latency (s), and the wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = total // clients

    def client() -> None:
        session = requests.Session()
        for _ in range(per_client):
            started = time.perf_counter()
            r = session.post(f"{url}/v1/jobs", files={"file": ("p.png", png)}, timeout=30)
            elapsed = time.perf_counter() - started
            assert r.status_code == 202, r.text
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", default="1,16")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gnosis-bench-"))
    primary = PrivateRedis(tmp / "primary").start(AOF)
    replica = PrivateRedis(tmp / "replica").start([*AOF, "--replicaof", "127.0.0.1", str(primary.port)])
    wait_until(lambda: redis.Redis(port=replica.port).info("replication").get("master_link_status") == "up",
               timeout=15, message="the replica to sync")
    stack = Stack(tmp, primary.url)
    stack.env.update(GNOSIS_ACCESS_LOG="off", GNOSIS_LOG_LEVEL="WARNING")
    try:
        apis = {"primary only": stack.api(workers=2, threads=16),
                "1 replica": stack.api(workers=2, threads=16, GNOSIS_ACCEPT_REPLICAS="1")}
        png = image_100kb()
        rows = [["clients", "accepted when", "p50 ms", "p99 ms", "jobs/s", "p50 ratio", "jobs/s ratio"]]
        result: dict = {"requests": args.requests, "runs": []}
        for clients in (int(c) for c in args.clients.split(",")):
            base = None
            for name, url in apis.items():
                submit_all(url, clients, min(50, args.requests), png)  # warm-up: connections, imports
                latencies, wall = submit_all(url, clients, args.requests, png)
                p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
                rate = len(latencies) / wall
                base = base or (p50, rate)
                run = {"clients": clients, "accepted_when": name, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                       "jobs_per_s": round(rate, 1), "p50_ratio": round(p50 / base[0], 2),
                       "rate_ratio": round(rate / base[1], 2)}
                result["runs"].append(run)
                rows.append([clients, name, run["p50_ms"], run["p99_ms"], run["jobs_per_s"], run["p50_ratio"],
                             run["rate_ratio"]])
                redis.Redis(port=primary.port).flushdb()  # the next run starts from an empty queue
        report("accept_replicas", result, rows)
    finally:
        stack.stop()
        replica.stop()
        primary.stop()


if __name__ == "__main__":
    sys.exit(main())
