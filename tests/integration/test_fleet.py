"""`gnosis-ocr workers`: the live workers as their heartbeats say, for an operator in an incident."""

from __future__ import annotations

import json
import subprocess
import sys

from harness.stack import free_port, wait_until
from tests.integration.test_batched_worker import batched


def workers(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "workers", *args], env=stack.env,
                          capture_output=True, text=True, timeout=60)


def test_the_workers_command_lists_live_workers_with_their_devices_and_drops_stopped_ones(stack, hub):
    none = workers(stack)
    assert none.returncode == 1 and none.stdout.strip() == "no live worker", none.stdout + none.stderr
    batched(stack, hub, tokens=4)
    worker = stack.worker(GNOSIS_WORKER_PORT=str(free_port()))
    # The page worker, and the light worker it starts beside itself (webhooks, cache warm-ups, listings).
    listed = wait_until(lambda: len(rows := json.loads(workers(stack, "--json").stdout)) == 2 and rows, timeout=60,
                        message="the worker and its light worker to be listed")
    record = next(r for r in listed if r["role"] == "pages")
    light = next(r for r in listed if r["role"] == "light")
    assert record["id"].startswith(f"gnosis-{worker.pid}@") and record["ready"] and record["in_flight"] == 0
    assert record["engine"] == "nanonets"
    assert record["devices"] == {"cpu": {"slots": 4, "decode_attention": "sdpa", "vision_attention": "batched",
                                         "patch_embed": "linear", "projections": "stacked", "norm": "exact",
                                         "prefill": "serial"}}
    assert light["ready"] and "devices" not in light
    table = workers(stack)
    assert table.returncode == 0
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["WORKER", "HOST", "ENGINE"]
    line = next(li for li in lines if li.startswith(record["id"]))
    assert " nanonets " in line and " yes " in line
    assert line.endswith("cpu: 4 slots, sdpa/batched/linear/stacked/exact/serial")
    assert " (light) " in next(li for li in lines if li.startswith(light["id"]))
    worker.stop()  # a clean stop takes its record with it
    wait_until(lambda: workers(stack).returncode == 1, timeout=30, message="the stopped worker to leave the list")


def test_the_workers_command_says_when_redis_cannot_be_read(stack):
    stack.env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = workers(stack)
    assert done.returncode == 1 and "cannot read the workers' records: Redis" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
