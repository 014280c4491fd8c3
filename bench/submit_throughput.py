"""Submit throughput: accepted POST /v1/jobs per second with 100 KB images and 32 concurrent clients
(wrk), the API under its production server config (2 processes; gevent, the default, and gthread with
16 threads), each against a minimal Flask handler that only stores the same bytes in Redis under the
same config, in the same run. Goal: >= 0.6 of that floor. Also reports Redis memory per queued job.

    python bench/submit_throughput.py [--seconds 8] [--connections 32] [--classes gevent,gthread]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import redis
import requests
from PIL import Image

from bench.common import ROOT, free_port, private_stack, report, wait_until
from gnosis_ocr.broker import queue_keys

WRK_SCRIPT = """
wrk.method = "POST"
local f = io.open(os.getenv("BODY_FILE"), "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. os.getenv("BOUNDARY")
"""


def image_100kb() -> bytes:
    side = 184  # random pixels do not compress: 184 * 184 * 3 bytes is about 100 KB of PNG
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wrk(url: str, body: Path, boundary: str, seconds: int, connections: int, script: Path) -> dict:
    env = {**os.environ, "BODY_FILE": str(body), "BOUNDARY": boundary}
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         env=env, capture_output=True, text=True, check=True).stdout
    requests_total = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    accepted = rate * (requests_total - errors) / max(requests_total, 1)
    return {"requests": requests_total, "rejected": errors, "accepted_per_s": round(accepted, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--classes", default="gevent,gthread")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="gnosis-submit-"))
    png = image_100kb()
    boundary = "gnosisbenchboundary"
    body = tmp / "body"
    body.write_bytes(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + png + f"\r\n--{boundary}--\r\n".encode())
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)

    stack, redis_proc = private_stack()
    rows, result = [["server", "worker class", "accepted/s", "requests", "rejected"]], {}
    try:
        stack.env["GNOSIS_MAX_QUEUE_DEPTH"] = str(10 ** 8)
        client = redis.Redis.from_url(stack.redis_url)
        for worker_class in args.classes.split(","):
            stack.env["GNOSIS_API_WORKER_CLASS"] = worker_class
            port = free_port()
            minimal = stack.procs.append(_minimal(stack, port)) or stack.procs[-1]
            wait_until(lambda: _up(f"http://127.0.0.1:{port}/v1/jobs", png), timeout=30, message="the minimal app")
            floor = wrk(f"http://127.0.0.1:{port}/v1/jobs", body, boundary, args.seconds, args.connections, script)
            minimal.stop()
            client.flushdb()

            url = stack.api(workers=2, threads=16)  # gnosis-ocr api's defaults: the production config
            api = stack.procs[-1]
            before = client.info("memory")["used_memory"]
            ours = wrk(f"{url}/v1/jobs", body, boundary, args.seconds, args.connections, script)
            jobs = sum(client.llen(key) for key in queue_keys("ocr"))  # one message a job, over the priority lists
            per_job = (client.info("memory")["used_memory"] - before) / max(jobs, 1)
            api.stop()
            client.flushdb()
            ratio = round(ours["accepted_per_s"] / floor["accepted_per_s"], 2)
            result[worker_class] = {"floor": floor, "gnosis": ours, "ratio": ratio, "queued_jobs": jobs,
                                    "redis_bytes_per_job": round(per_job)}
            rows += [["minimal flask + redis SET", worker_class, floor["accepted_per_s"], floor["requests"],
                      floor["rejected"]],
                     ["gnosis-ocr POST /v1/jobs", worker_class, ours["accepted_per_s"], ours["requests"],
                      ours["rejected"]],
                     ["ratio", worker_class, ratio, "", ""],
                     ["redis bytes per queued job", worker_class, round(per_job), f"({len(png)} B image)", ""]]
        report("submit_throughput", {"image_bytes": len(png), "connections": args.connections,
                                     "seconds": args.seconds, **result}, rows)
    finally:
        stack.stop()
        redis_proc.stop()


def _minimal(stack, port: int):
    from harness.stack import Proc

    return Proc([sys.executable, "-m", "bench.minimal_app", str(port)], stack.env, stack.tmp / "minimal.log")


def _up(url: str, png: bytes) -> bool:
    try:
        return requests.post(url, files={"file": ("p.png", png)}, timeout=2).status_code == 202
    except requests.RequestException:
        return False


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
