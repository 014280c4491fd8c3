"""A soak run with faults that counts every job. Not part of CI.

  python -m bench.soak                       # 10 minutes, Sentinel failover once
  python -m bench.soak --minutes 3 --redis restart

Clients submit a steady mix of images and multi-page PDFs through the API (CPU engine) while a fault
injector SIGKILLs a random worker (its whole process tree) every minute and starts a new one, fails
over the Sentinel primary (or restarts a Redis with AOF) once at half time, takes Redis out of memory
(`maxmemory` lowered below what it uses) for `--oom-seconds` at a quarter of the time, takes it away
altogether for `--outage-seconds` at three quarters (with `--redis restart`; `--demote-seconds` makes
it a replica with REPLICAOF at five eighths, then primary again), and cancels or deletes
some jobs. With `--client-timeout S` the clients are `gnosis_ocr.client.Client` (an Idempotency-Key on
every submission, retried through timeouts and 503s as a real client retries): an answer lost to the
timeout is then asked for again with the same key. After each Redis episode it times how long until
every worker's `/readyz` says 200 again. With `--batch-every S` a batch of `--batch-documents`
one-page images goes from a GCS emulator's bucket to another prefix every S seconds, and each must end
with every document counted once and a result object for each document done; with `--batch-key-pages N`
the clients and the batches each have an API key, whose pages waiting are bounded at N, so a batch of more
documents is still listing, page by page, through the Redis episodes.
With `--engine nanonets` the workers run the GPU path, the batched engine (a threads pool feeding one
continuous batch), on a tiny Qwen2.5-VL on the CPU, downloaded once into the shared cache from a local
stand-in for the hub; with `--engine-death-steps N` each worker's engine also dies as after a sticky CUDA
error after a random N/2 to 3N/2 decode steps (`tests/faulty_worker.py`), and the worker, exiting 70, is
replaced as a supervisor would.
At the end it waits for the backlog to drain and prints one table. "lost" is a job that was accepted
(202) and then neither reached a final state nor was deleted by the client.
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
from bench.soak_batches import Batches
from bench.soak_webhooks import Webhooks
from bench.soak_workers import Workers
from gnosis_ocr.client import ApiError, Client
from harness.docs import pdf_of_pages, text_image
from harness.redisproc import SentinelGroup, follow


class Soak(Batches, Webhooks, Workers):
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
                              GNOSIS_HEARTBEAT_INTERVAL="2", GNOSIS_REDIS_TIMEOUT="2",
                              GNOSIS_RECONCILE_GRACE=str(args.reconcile_grace),
                              GNOSIS_ACCEPT_REPLICAS=args.accept_replicas, GNOSIS_ACCEPT_REPLICAS_WAIT="1")
        self.key = self.batch_key = None  # --batch-key-pages: the clients' key and the batches'
        if args.batch_key_pages:
            self.key, self.batch_key = "soak-key", "soak-batch-key"
            self.stack.env.update(GNOSIS_API_KEYS=f"{self.key},{self.batch_key}",
                                  GNOSIS_MAX_KEY_PAGES=str(args.batch_key_pages))
        self.auth = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.hub = None
        if args.engine == "nanonets":
            self.batched_engine()
        if args.webhooks:
            self.start_webhooks()
        self.accepted: dict[str, float] = {}
        self.deleted: set[str] = set()
        self.cancelled: set[str] = set()
        self.refused = {"429": 0, "503": 0, "other": 0}
        self.refused_503: dict[str, int] = {}  # by error code: Redis away, full, or replicas short
        self.retried_out: dict[str, int] = {}  # --client-timeout: what the client gave up on, by code
        self.duplicates = 0
        self.batches: dict[str, str] = {}  # batch id -> its destination prefix
        self.bucket = None
        self.events: list[str] = []
        self.peak_memory = 0
        self.ready_again: list[float] = []  # seconds after each Redis episode until every worker was ready
        self.ports: dict[int, int] = {}  # worker pid -> its probe port
        self.exits: dict[int, int] = {}  # workers that exited on their own, by exit status (70: engine dead)
        self.stop = threading.Event()  # the run is over: no more submissions or faults
        self.drained = threading.Event()  # the tally is done: the supervisor may stop replacing workers

    def document(self, n: int) -> tuple[str, bytes]:
        if self.rng.random() < 0.3:
            pages = self.rng.randint(2, 4)
            return f"doc{n}.pdf", pdf_of_pages([[f"Soak document {n} page {p}"] for p in range(pages)])
        return f"img{n}.png", text_image([f"Soak image {n}", "steady traffic"])

    def post(self, url: str, name: str, data: bytes) -> requests.Response | str:
        """One submission: the response, or with `--client-timeout` the job id the retrying client got."""
        hook = {"callback_url": self.callback_url} if self.callback_url else {}
        if not self.args.client_timeout:
            return requests.post(f"{url}/v1/jobs", files={"file": (name, data)}, data=hook, headers=self.auth,
                                 timeout=15)
        from gnosis_ocr.client import ApiError, Client

        path = self.tmp / "uploads" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        client = Client(url, api_key=self.key, timeout=self.args.client_timeout, retries=8, backoff=0.5)
        try:
            return client.submit(path, **hook)["id"]
        except ApiError as exc:  # what is left after its retries: answered like a plain response
            self.retried_out[exc.code or "?"] = self.retried_out.get(exc.code or "?", 0) + 1
            raise requests.RequestException(str(exc)) from exc

    def submit_loop(self, url: str) -> None:
        n = 0
        while not self.stop.is_set():
            name, data = self.document(n)
            n += 1
            try:
                r = self.post(url, name, data)
                if isinstance(r, str) or r.status_code == 202:
                    job_id = r if isinstance(r, str) else r.json()["id"]
                    if job_id in self.accepted:
                        self.duplicates += 1  # one id answered to two submissions: never expected
                    self.accepted[job_id] = time.time()
                    roll = self.rng.random()
                    if roll < 0.05:
                        requests.post(f"{url}/v1/jobs/{job_id}/cancel", headers=self.auth, timeout=15)
                        self.cancelled.add(job_id)
                    elif roll < 0.10 and self.delete(url, job_id):
                        self.deleted.add(job_id)
                else:
                    self.refused[str(r.status_code) if r.status_code in (429, 503) else "other"] += 1
                    if r.status_code == 503:
                        code = r.json().get("error", {}).get("code", "?")
                        self.refused_503[code] = self.refused_503.get(code, 0) + 1
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

    def primary_client(self):
        import redis

        port = self.redis.primary_port() if isinstance(self.redis, SentinelGroup) else self.redis.port
        return redis.Redis(port=port, socket_timeout=2)

    def faults(self, workers: list) -> None:
        started = time.monotonic()
        failed_over = oomed = outaged = demoted = False
        next_kill = started + self.args.kill_every
        total = self.args.minutes * 60
        while not self.drained.is_set():
            now = time.monotonic()
            at = f"{now - started:.0f}s"
            # As a supervisor would, through the drain too: start another.
            for proc in [p for p in workers if not p.alive()]:
                workers.remove(proc)
                workers.append(self.worker())
                self.exits[proc.popen.returncode] = self.exits.get(proc.popen.returncode, 0) + 1
                self.events.append(f"{at} worker {proc.pid} exited ({proc.popen.returncode}); started another")
            if self.stop.is_set():  # the backlog drains: no more faults
                self.drained.wait(1)
                continue
            if now >= next_kill:
                victim = self.rng.choice(workers)
                victim.kill_tree()
                workers.remove(victim)
                workers.append(self.worker())
                self.events.append(f"{at} kill worker {victim.pid}")
                next_kill = now + self.args.kill_every
            if self.args.oom_seconds and not oomed and now - started >= total / 4:
                oomed = True
                client = self.primary_client()
                used = client.info("memory")["used_memory"]
                client.config_set("maxmemory", max(used - 2**20, 2**20))  # every growing write refused
                self.events.append(f"{at} Redis out of memory for {self.args.oom_seconds:.0f}s")
                self.stop.wait(self.args.oom_seconds)
                client.config_set("maxmemory", 0)
                self.time_until_ready(workers, time.monotonic())
            if not failed_over and now - started >= total / 2:
                failed_over = True
                if isinstance(self.redis, SentinelGroup) and self.args.graceful:
                    import redis as redis_py  # the sentinels' own command, as an operator's maintenance

                    redis_py.Redis(port=self.redis.sentinel_ports[0]).execute_command(
                        "SENTINEL", "FAILOVER", SentinelGroup.MASTER)
                    self.events.append(f"{at} SENTINEL FAILOVER (graceful: the old primary lives on)")
                elif isinstance(self.redis, SentinelGroup):
                    self.redis.primary.stop(signal.SIGKILL)
                    self.events.append(f"{at} kill the Redis primary (Sentinel failover)")
                else:
                    self.redis.stop(signal.SIGKILL)
                    self.redis.start()
                    self.events.append(f"{at} restart Redis (AOF)")
                    self.time_until_ready(workers, time.monotonic())
            if (self.args.demote_seconds and not demoted and not isinstance(self.redis, SentinelGroup)
                    and now - started >= total * 5 / 8):
                demoted = True
                self.demote(at, workers)
            if (self.args.outage_seconds and not outaged and not isinstance(self.redis, SentinelGroup)
                    and now - started >= total * 3 / 4):
                outaged = True
                self.redis.stop(signal.SIGTERM)  # AOF flushed: an orderly maintenance restart
                self.events.append(f"{at} Redis away for {self.args.outage_seconds:.0f}s")
                self.stop.wait(self.args.outage_seconds)
                self.redis.start()
                self.time_until_ready(workers, time.monotonic())
            self.stop.wait(1)

    def demote(self, at: str, workers: list) -> None:
        """The primary made a replica with REPLICAOF alone for --demote-seconds, then primary again, on the
        same address throughout (as an operator swaps roles, or a Kubernetes Redis operator does)."""
        import redis as redis_py

        other = PrivateRedis(self.tmp / "other").start()
        try:
            follow(other.port, self.redis.port, timeout=60)
            follow(self.redis.port, other.port, timeout=60)
            self.events.append(f"{at} Redis primary demoted by REPLICAOF for {self.args.demote_seconds:.0f}s")
            self.stop.wait(self.args.demote_seconds)
            follow(other.port, self.redis.port, timeout=60)
        finally:
            redis_py.Redis(port=self.redis.port).replicaof("NO", "ONE")
            other.stop()
        self.time_until_ready(workers, time.monotonic())

    def run(self) -> dict:
        if self.args.batch_every:
            self.start_bucket()
        url = self.stack.api(workers=2)
        workers = [self.worker() for _ in range(self.args.workers)]
        for proc in workers:
            self.stack.wait_worker_ready(proc)
        # The fault injector is also the supervisor: it runs on through the drain, until the tally is done.
        supervisor = threading.Thread(target=self.faults, args=(workers,), daemon=True)
        threads = [threading.Thread(target=self.submit_loop, args=(url,), daemon=True),
                   threading.Thread(target=self.sample_memory, daemon=True)]
        if self.args.batch_every:
            threads.append(threading.Thread(target=self.batch_loop, args=(url,), daemon=True))
        for t in [*threads, supervisor]:
            t.start()
        self.stop.wait(self.args.minutes * 60)
        self.stop.set()
        for t in threads:
            t.join(timeout=60)
        try:
            return self.tally(url)
        finally:
            self.drained.set()
            supervisor.join(timeout=60)

    def delete(self, url: str, job_id: str) -> bool:
        """As a client deletes: sent again through 503s (under GNOSIS_ACCEPT_REPLICAS one can answer a deletion
        that is on the primary but not yet confirmed by a replica), a repeat's 404 being the deletion done."""
        try:
            Client(url, api_key=self.key, timeout=15, retries=4, backoff=0.5).delete(job_id)
            return True
        except (ApiError, requests.RequestException):
            return False

    def tally(self, url: str) -> dict:
        deadline = time.monotonic() + self.args.drain * 60
        finals: dict[str, dict] = {}
        pending = [j for j in self.accepted if j not in self.deleted]
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                r = requests.get(f"{url}/v1/jobs/{job_id}", headers=self.auth, timeout=15)
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
            "accept_replicas": self.args.accept_replicas,
            "refused_429": self.refused["429"], "refused_503": self.refused["503"], "errors": self.refused["other"],
            "refused_503_by_code": self.refused_503,
            "client_timeout": self.args.client_timeout, "client_gave_up_by_code": self.retried_out,
            "ids_answered_twice": self.duplicates,
            "succeeded": counts.get("succeeded", 0), "cancelled": counts.get("cancelled", 0),
            "deleted": len(self.deleted),
            "failed": {k: v for k, v in counts.items() if k.startswith("failed")},
            "still_running": len(pending), "lost": counts.get("lost", 0), "pages_run_more_than_once": extra,
            "p50_submit_to_final_s": round(percentile(seconds, 50), 1),
            "p99_submit_to_final_s": round(percentile(seconds, 99), 1),
            "peak_redis_memory_mib": round(self.peak_memory / 2**20, 1),
            "all_workers_ready_again_s": self.ready_again,
            "engine": self.args.engine, "workers_exited_by_status": self.exits,
            "put_right_by_housekeepers": self.put_right(url),
            **(self.tally_batches(url, deadline) if self.args.batch_every else {}),
            **(self.tally_webhooks(finals, self.deleted, deadline + 60) if self.args.webhooks else {}),
            "faults": self.events,
        }

    def put_right(self, url: str) -> dict:
        """What the housekeepers found and put right, from the cluster's counters on the API's /metrics."""
        from harness.stack import metric_totals

        try:
            totals = metric_totals(requests.get(f"{url}/metrics", timeout=15).text)
        except requests.RequestException:
            return {}
        names = ("pages_republished", "batch_listings_republished", "housekeeping_failures")
        return {name: totals.get(f"gnosis_{name}_total", 0) for name in names}

    def close(self) -> None:
        self.stack.stop()
        self.redis.stop()
        if self.hub is not None:
            self.hub.stop()
        self.stop_webhooks()
        if self.bucket is not None:
            self.emulator.stop()


def _stamp(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--drain", type=float, default=5, help="minutes to wait for the backlog at the end")
    parser.add_argument("--rate", type=float, default=0.5, help="submissions per second")
    parser.add_argument("--client-timeout", type=float, default=0,
                        help="submit with the retrying client, this many seconds per try (0: plain requests)")
    parser.add_argument("--graceful", action="store_true",
                        help="with Sentinel: SENTINEL FAILOVER at half time instead of killing the primary")
    parser.add_argument("--batch-every", type=float, default=0, help="seconds between batches (0: no batches)")
    parser.add_argument("--batch-documents", type=int, default=10)
    parser.add_argument("--batch-key-pages", type=int, default=0,
                        help="API keys on, GNOSIS_MAX_KEY_PAGES this: a batch of more documents lists for as long as "
                             "its pages take, through the Redis episodes (0: no keys)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=60, help="seconds between worker kills")
    parser.add_argument("--redis", choices=["sentinel", "restart"], default="sentinel")
    parser.add_argument("--engine", default="rapidocr",
                        help="the workers' OCR_ENGINE; nanonets: the batched engine on a tiny model on the CPU")
    parser.add_argument("--webhooks", action="store_true",
                        help="every job with a callback_url; each final one must be POSTed, signed, with its state")
    parser.add_argument("--slots", type=int, default=4, help="--engine nanonets: OCR_BATCH_SIZE")
    parser.add_argument("--tokens", type=int, default=64, help="--engine nanonets: OCR_MAX_NEW_TOKENS")
    parser.add_argument("--prefill-concurrent", action="store_true",
                        help="--engine nanonets: OCR_PREFILL_CONCURRENT=on, the GPU's default, on the CPU")
    parser.add_argument("--engine-death-steps", type=int, default=0,
                        help="--engine nanonets: each worker's engine dies after about this many decode steps")
    parser.add_argument("--oom-seconds", type=float, default=30, help="Redis out of memory this long (0: never)")
    parser.add_argument("--outage-seconds", type=float, default=20,
                        help="Redis stopped this long (--redis restart only; 0: never)")
    parser.add_argument("--demote-seconds", type=float, default=0,
                        help="with --redis restart: the primary a replica (REPLICAOF) this long at 5/8 of the time")
    parser.add_argument("--reconcile-grace", type=float, default=30, help="GNOSIS_RECONCILE_GRACE of the workers")
    parser.add_argument("--accept-replicas", default="0",
                        help="GNOSIS_ACCEPT_REPLICAS of the API (connected: a 202 once the replica has the job)")
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
