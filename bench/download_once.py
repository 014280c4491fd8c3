"""Download once: N = 1, 3, 6 processes start together on an empty cache against the local hub
stand-in, serving a 50 MB model over a throttled link. Reports bytes served / model size (goal 1.00
for every N) and time until all are ready / the time for N = 1 (goal <= 1.15).

Each process runs `gnosis-ocr cache warm`: the same ModelCache.ensure_ready a worker runs at start,
without the torch import, so the numbers measure the download protocol, not import contention.

    python bench/download_once.py [--mb 50] [--rate-mb 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.common import ROOT, PrivateRedis, report
from harness.hubstub import HubStub
from harness.tinymodel import build_tiny_model

REPO = "bench-org/padded-ocr"


def run(n: int, stub: HubStub, base_env: dict) -> tuple[float, int]:
    tmp = Path(tempfile.mkdtemp(prefix=f"gnosis-dl{n}-"))
    redis_proc = PrivateRedis(tmp / "redis", appendonly=False).start()
    try:
        stub.reset_counts()
        env = {**base_env, "REDIS_URL": redis_proc.url, "MODEL_CACHE_PATH": str(tmp / "cache")}
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "gnosis_ocr.cli", "cache", "warm"], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
        codes = [p.wait(timeout=600) for p in procs]
        seconds = time.perf_counter() - started
        assert codes == [0] * n, codes
        assert redis.Redis.from_url(redis_proc.url).exists(f"gnosis:cache:{REPO}@main:record")
        return seconds, stub.bytes_served
    finally:
        redis_proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--rate-mb", type=float, default=10.0, help="throttle, MB/s")
    args = parser.parse_args()
    import os

    model = build_tiny_model(tempfile.mkdtemp(prefix="gnosis-padded-"), pad_mb=args.mb - 1)
    stub = HubStub(REPO, model, rate=args.rate_mb * 1024 * 1024).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GNOSIS_", "OCR_"))}
    env.update(OCR_MODEL_ID=REPO, HF_ENDPOINT=stub.url, GNOSIS_LEASE_TTL="10", GNOSIS_LOG_LEVEL="WARNING")
    try:
        rows = [["N", "seconds", "bytes served / model", "time / time(N=1)"]]
        result = {"model_bytes": stub.model_bytes, "rate_mb_s": args.rate_mb, "runs": {}}
        base = None
        for n in (1, 3, 6):
            seconds, served = run(n, stub, env)
            base = base or seconds
            entry = {"seconds": round(seconds, 2), "bytes_ratio": round(served / stub.model_bytes, 3),
                     "time_ratio": round(seconds / base, 2)}
            result["runs"][n] = entry
            rows.append([n, entry["seconds"], entry["bytes_ratio"], entry["time_ratio"]])
        report("download_once", result, rows)
    finally:
        stub.stop()


if __name__ == "__main__":
    main()
