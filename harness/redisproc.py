"""A private redis-server for fault tests: its own port and directory, stopped and started at will."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import redis

from harness.stack import free_port, wait_until


def deny_job_keys(admin, denied: bool) -> None:
    """The `worker` ACL user (tests' `acl_redis`) refused, or given back, the job records (`gnosis:job:*`,
    `gnosis:jobs:*`), as an out-of-memory or read-only Redis would refuse them; the broker and the
    heartbeats go on."""
    keys = ["[^g]*", "gnosis-*", "gnosis:[^j]*"] if denied else ["*"]
    admin.acl_setuser("worker", enabled=True, reset_keys=True, keys=keys)


def follow(replica_port: int, leader_port: int, *, timeout: float = 15) -> None:
    """Roles swapped with REPLICAOF alone, as an operator (or a Kubernetes Redis operator) does: the leader
    is made a primary, the other follows it; returns once their link is up. A leader that was a replica
    first catches up with its primary, as in a switchover: replication is asynchronous, and promoted a
    moment early it would lack the last writes (a test's messages, 1 run in 10)."""
    leader = redis.Redis(port=leader_port)
    info = leader.info("replication")
    if info["role"] == "slave":
        primary = redis.Redis(port=info["master_port"])
        wait_until(lambda: leader.info("replication").get("slave_repl_offset", -1)
                   >= primary.info("replication")["master_repl_offset"], timeout=timeout,
                   message="the leader to catch up with its primary")
    leader.replicaof("NO", "ONE")
    redis.Redis(port=replica_port).replicaof("127.0.0.1", leader_port)
    wait_until(lambda: redis.Redis(port=replica_port).info("replication").get("master_link_status") == "up",
               timeout=timeout, message="the replica to sync")


class PrivateRedis:
    def __init__(self, workdir: Path, *, appendonly: bool = True) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: list[str] | None = None) -> PrivateRedis:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for fault tests"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--maxmemory-policy", "noeviction", "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        args += extra or []
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up():
            try:
                return client.ping()
            except redis.RedisError:
                return False

        wait_until(up, timeout=15, message="the private redis-server to start")
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def pause(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGCONT)


class SentinelGroup:
    """A primary, a replica and three sentinels on loopback: a real Sentinel failover, in seconds."""

    MASTER = "gnosis"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.primary = PrivateRedis(workdir / "primary")
        self.replica = PrivateRedis(workdir / "replica")
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://{hosts}/{self.MASTER}/0"

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.start(extra=["--replicaof", "127.0.0.1", str(self.primary.port)])
        wait_until(lambda: redis.Redis(port=self.replica.port).info("replication").get("master_link_status") == "up",
                   timeout=15, message="the replica to sync")
        binary = shutil.which("redis-server")
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n")
            self.sentinels.append(subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))

        def all_see_the_replica():
            try:
                return all(redis.Redis(port=p).sentinel_master(self.MASTER)["num-slaves"] >= 1 and
                           redis.Redis(port=p).sentinel_master(self.MASTER)["num-other-sentinels"] >= 2
                           for p in self.sentinel_ports)
            except (redis.RedisError, KeyError):
                return False

        wait_until(all_see_the_replica, timeout=30, message="the sentinels to find the replica and each other")
        return self

    def primary_port(self) -> int:
        return int(redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(self.MASTER)[1])

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.primary.stop()
        self.replica.stop()
