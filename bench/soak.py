"""Issue 11: a soak run with faults that counts every job. Not part of CI.

  python -m bench.soak                       # 10 minutes, Sentinel failover once
  python -m bench.soak --minutes 3 --redis restart

Clients submit a steady mix of images and multi-page PDFs through the API (CPU engine) while a fault
injector SIGKILLs a random worker (its whole process tree) every minute and starts a new one, fails
over the Sentinel primary (or restarts a Redis with AOF) once at half time, and cancels or deletes
some jobs. At the end it waits for the backlog to drain and prints one table. "lost" is a job that
was accepted (202) and then neither reached a final state nor was deleted by the client.
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import PrivateRedis, Stack, percentile, report
from tests.docs import pdf_of_pages, text_image
from tests.redisproc import SentinelGroup


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = tmp
        if args.redis == "sentinel":
            self.redis = SentinelGroup(tmp / "sentinel").start()
        else:
            self.redis = PrivateRedis(tmp / "redis").start()
        self.stack = Stack(tmp, self.redis.url)
        self.stack.env.update(OCR_ENGINE=args.engine, GNOSIS_INPUT_STORE=str(tmp / "inputs"),
                              GNOSIS_HEARTBEAT_INTERVAL="2", GNOSIS_REDIS_TIMEOUT="2")
        self.accepted: dict[str, float] = {}
        self.deleted: set[str] = set()
        self.cancelled: set[str] = set()
        self.refused = {"429": 0, "503": 0, "other": 0}
        self.events: list[str] = []
        self.peak_memory = 0
        self.stop = threading.Event()

    def document(self, n: int) -> tuple[str, bytes]:
        if self.rng.random() < 0.3:
            pages = self.rng.randint(2, 4)
            return f"doc{n}.pdf", pdf_of_pages([[f"Soak document {n} page {p}"] for p in range(pages)])
        return f"img{n}.png", text_image([f"Soak image {n}", "steady traffic"])

    def submit_loop(self, url: str) -> None:
        n = 0
        while not self.stop.is_set():
            name, data = self.document(n)
            n += 1
            try:
                r = requests.post(f"{url}/v1/jobs", files={"file": (name, data)}, timeout=15)
                if r.status_code == 202:
                    job_id = r.json()["id"]
                    self.accepted[job_id] = time.time()
                    roll = self.rng.random()
                    if roll < 0.05:
                        requests.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=15)
                        self.cancelled.add(job_id)
                    elif roll < 0.10:
                        if requests.delete(f"{url}/v1/jobs/{job_id}", timeout=15).status_code == 204:
                            self.deleted.add(job_id)
                else:
                    self.refused[str(r.status_code) if r.status_code in (429, 503) else "other"] += 1
            except requests.RequestException:
                self.refused["other"] += 1
            self.stop.wait(1 / self.args.rate)

    def sample_memory(self) -> None:
        from gnosis_ocr.redisconn import connect

        client = connect(self.redis.url, socket_timeout=2, socket_connect_timeout=2)
        while not self.stop.is_set():
            try:
                self.peak_memory = max(self.peak_memory, client.info("memory")["used_memory"])
            except Exception:  # during the failover
                pass
            self.stop.wait(1)

    def faults(self, workers: list) -> None:
        started = time.monotonic()
        failed_over = False
        next_kill = started + self.args.kill_every
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_kill:
                victim = self.rng.choice(workers)
                victim.kill_tree()
                workers.remove(victim)
                workers.append(self.stack.worker(concurrency=1, wait_ready=False))
                self.events.append(f"{now - started:.0f}s kill worker {victim.pid}")
                next_kill = now + self.args.kill_every
            if not failed_over and now - started >= self.args.minutes * 30:
                failed_over = True
                if isinstance(self.redis, SentinelGroup):
                    self.redis.primary.stop(signal.SIGKILL)
                    self.events.append(f"{now - started:.0f}s kill the Redis primary (Sentinel failover)")
                else:
                    self.redis.stop(signal.SIGKILL)
                    self.redis.start()
                    self.events.append(f"{now - started:.0f}s restart Redis (AOF)")
            self.stop.wait(1)

    def run(self) -> dict:
        url = self.stack.api(workers=2)
        workers = [self.stack.worker(concurrency=1) for _ in range(self.args.workers)]
        threads = [threading.Thread(target=self.submit_loop, args=(url,), daemon=True),
                   threading.Thread(target=self.sample_memory, daemon=True),
                   threading.Thread(target=self.faults, args=(workers,), daemon=True)]
        for t in threads:
            t.start()
        self.stop.wait(self.args.minutes * 60)
        self.stop.set()
        for t in threads:
            t.join(timeout=60)
        return self.tally(url)

    def tally(self, url: str) -> dict:
        deadline = time.monotonic() + self.args.drain * 60
        finals: dict[str, dict] = {}
        pending = [j for j in self.accepted if j not in self.deleted]
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                r = requests.get(f"{url}/v1/jobs/{job_id}", timeout=15)
                if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                    finals[job_id] = r.json()
                elif r.status_code == 200:
                    still.append(job_id)
                else:
                    finals[job_id] = {"status": "lost"}
            pending = still
            if pending:
                time.sleep(2)  # polling the backlog while it drains
        counts: dict[str, int] = {}
        for job in finals.values():
            key = job["status"] if job["status"] != "failed" else f"failed ({job['error']['code']})"
            counts[key] = counts.get(key, 0) + 1
        seconds = [(_stamp(j["finished_at"]) - _stamp(j["created_at"])) for j in finals.values()
                   if j.get("finished_at") and j["status"] == "succeeded"]
        extra = sum(max(j["attempts"] - j["pages_total"], 0) for j in finals.values() if j["status"] == "succeeded")
        return {
            "minutes": self.args.minutes, "redis": self.args.redis, "accepted": len(self.accepted),
            "refused_429": self.refused["429"], "refused_503": self.refused["503"], "errors": self.refused["other"],
            "succeeded": counts.get("succeeded", 0), "cancelled": counts.get("cancelled", 0),
            "deleted": len(self.deleted),
            "failed": {k: v for k, v in counts.items() if k.startswith("failed")},
            "still_running": len(pending), "lost": counts.get("lost", 0), "pages_run_more_than_once": extra,
            "p50_submit_to_final_s": round(percentile(seconds, 50), 1),
            "p99_submit_to_final_s": round(percentile(seconds, 99), 1),
            "peak_redis_memory_mib": round(self.peak_memory / 2**20, 1), "faults": self.events,
        }

    def close(self) -> None:
        self.stack.stop()
        self.redis.stop()


def _stamp(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--drain", type=float, default=5, help="minutes to wait for the backlog at the end")
    parser.add_argument("--rate", type=float, default=0.5, help="submissions per second")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=60, help="seconds between worker kills")
    parser.add_argument("--redis", choices=["sentinel", "restart"], default="sentinel")
    parser.add_argument("--engine", default="rapidocr")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    soak = Soak(args, Path(tempfile.mkdtemp(prefix="gnosis-soak-")))
    try:
        result = soak.run()
    finally:
        soak.close()
    rows = [["measure", "value"]] + [[k, v] for k, v in result.items() if k != "faults"]
    report("soak", result, rows)
    for event in result["faults"]:
        print("  fault:", event)


if __name__ == "__main__":
    main()
