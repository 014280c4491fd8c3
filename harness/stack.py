"""Real processes for the tests and the benchmarks: a gnosis-ocr stack (API and workers as child
processes against a Redis), and waiting on conditions with a deadline instead of sleeping."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def _test_redis_url() -> str:
    """The test Redis; under pytest-xdist each worker process takes its own database (15, 14, …), so
    their flushes and key scans never meet."""
    url = os.environ.get("GNOSIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    base, _, db = url.rpartition("/")
    if not worker.startswith("gw") or not db.isdigit() or "//" not in base:
        return url
    return f"{base}/{int(db) - int(worker[2:])}"


TEST_REDIS_URL = _test_redis_url()


ROOT = Path(__file__).resolve().parent.parent
"""The repository's root: the working directory of every process started here."""


def wait_until(predicate, *, timeout: float = 30, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    """A port nothing holds now, below the kernel's range of ephemeral ports. A port the kernel picks
    (a bind to 0) comes from the range it also gives every outgoing connection, and the tests open
    thousands (Redis clients, HTTP), so one could take the port before the process meant to listen on
    it binds it: seen in CI. Below the range no connection is given one; test processes pick at random
    and check with a bind, so two rarely pick the same."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # a service's, or a test's that is listening or in TIME_WAIT
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: IANA's dynamic range begins here
        return 49152


class Proc:
    """A child process in its own session, so the whole tree (pool children too) can be signalled."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def sigterm(self, *, timeout: float) -> int:
        """SIGTERM to the process alone, as a scale-in sends it; its exit code once it has left, or an
        AssertionError with its log's tail if it is still running after `timeout` seconds."""
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout:.0f} s after SIGTERM:\n{self.log()[-4000:]}") from None

    def kill_tree(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        stop_all([self])


def stop_all(procs: list[Proc], grace: float = 4.0) -> None:
    """SIGTERM to every tree at once, one shared grace period, then SIGKILL: a process whose Redis a test
    has stopped retries its goodbyes for a minute, and at teardown nothing is asserted any more, so
    stopping them one after the other would only add their graces up."""
    for proc in procs:
        if proc.alive():
            proc.kill_tree(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        proc.kill_tree(signal.SIGKILL)  # stragglers in the group (pool children, downloaders)
        if proc.popen.poll() is None:
            proc.popen.wait(timeout=10)
        proc._log.close()


class Stack:
    """Starts gnosis-ocr processes against the test Redis and stops them all at teardown."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.tmp = tmp_path
        self.redis_url = redis_url
        from gnosis_ocr.redisconn import connect

        self.redis = connect(redis_url)
        self.procs: list[Proc] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GNOSIS_", "OCR_"))}
        self.env.update({
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": redis_url,
            "MODEL_CACHE_PATH": str(tmp_path / "cache"),
            "OCR_ENGINE": "tesseract",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1",
            "GNOSIS_HEARTBEAT_INTERVAL": "1",
            # An API being stopped waits for idle keep-alive connections this long.
            "GNOSIS_HEADER_TIMEOUT": "1",
        })

    def spawn(self, name: str, args: list[str], **env: str) -> Proc:
        proc = Proc([sys.executable, "-m", "gnosis_ocr.cli", *args], {**self.env, **env},
                    self.tmp / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def api(self, *, workers: int = 1, threads: int = 8, **env: str) -> str:
        for _ in range(5):
            # free_port's port is free when it answers, not when the API binds it: another test process
            # may take it in between, and the API then exits with that one line (check_listen).
            port = free_port()
            proc = self.spawn("api", ["api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                                      "--threads", str(threads)], **env)
            url = f"http://127.0.0.1:{port}"

            def up(proc=proc, url=url):
                assert proc.alive() or "another process holds the port" in proc.log(), proc.log()
                if not proc.alive():
                    return "taken"
                try:
                    return requests.get(url + "/healthz", timeout=1).status_code == 200
                except requests.RequestException:
                    return False

            if wait_until(up, timeout=30, message="the API to answer") is True:
                return url
        raise AssertionError("every port free_port gave was taken before the API could listen on it")

    def worker(self, *, concurrency: int = 1, wait_ready: bool = True, **env: str) -> Proc:
        proc = self.spawn("worker", ["worker", f"--concurrency={concurrency}"], **env)
        if wait_ready:
            self.wait_worker_ready(proc)
        return proc

    def wait_worker_ready(self, proc: Proc, timeout: float = 90) -> None:
        """Consuming, and every pool process has its engine loaded."""
        import json

        from gnosis_ocr import keys
        from gnosis_ocr.redisconn import connect

        client = connect(self.env["REDIS_URL"])

        def ready():
            assert proc.alive(), proc.log()
            for key in client.scan_iter(keys.WORKER_RECORDS):
                if not keys.is_worker_record(key):
                    continue
                info = json.loads(client.get(key) or b"{}")
                if info.get("pid") == proc.pid and info.get("engines_loaded", 0) >= max(info["concurrency"], 1):
                    return True
            return False

        wait_until(ready, timeout=timeout, message=f"worker {proc.pid} to be ready")

    def stop(self) -> None:
        stop_all(list(reversed(self.procs)))


def poll_job(url: str, job_id: str, *, timeout: float = 60, headers: dict | None = None) -> dict:
    """Long-poll until final: the API holds the request, the test does not sleep."""
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{url}/v1/jobs/{job_id}", params={"wait": 5}, timeout=15, headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job


def metric_totals(text: str) -> dict[str, float]:
    """Prometheus text summed over each metric's labels (a worker's GPUs, say), by metric name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out
