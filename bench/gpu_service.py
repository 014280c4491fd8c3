"""The whole service on the engine of `bench/gpu_engine.py`: Redis, the API under gunicorn, a real worker
loading the checkpoint through the shared-cache code from a local stand-in hub, and clients submitting
one-page jobs at once. The `service` section of `bench/gpu_engine.py` (on a GPU) and of
`bench/service_host.py` (a stand-in device on a CPU)."""

from __future__ import annotations

import os
import sys
import threading
import time

from bench.gpu_engine import MIX
from bench.gpu_throughput import a4_page


def service(path: str, *, jobs: int, clients: int, tiny: bool, batch: int = 0, standin: str | None = None,
            settings: dict[str, str] | None = None) -> dict:
    """API + Redis + a real worker loading the model through the cache code, `jobs` one-page jobs at once;
    `batch` slots per GPU (0: the engine sizes it); `settings`, more of the worker's environment. Also where
    the GPU's time went, from the worker's own metrics: prefill against decode, and the batch's mean
    occupancy."""
    import io

    import requests

    from bench.common import private_stack
    from harness.hubstub import HubStub
    from harness.stack import Proc, free_port, metric_totals, wait_until

    stack, redis_proc = private_stack()
    stub = HubStub("bench/nanonets-random", path).start()
    worker_port = free_port()
    try:
        env = {"OCR_ENGINE": "nanonets", "OCR_MODEL_ID": "bench/nanonets-random", "HF_ENDPOINT": stub.url,
               "OCR_MAX_NEW_TOKENS": str(max(MIX)), "OCR_REPETITION_WINDOW": "0", "OCR_BATCH_SIZE": str(batch),
               "GNOSIS_WORKER_PORT": str(worker_port),
               "GNOSIS_BENCH_LENGTHS": ",".join(map(str, MIX)), "GNOSIS_LOG_LEVEL": "INFO",
               **({"GNOSIS_BENCH_STANDIN": standin} if standin else {}),
               # `--tiny` runs prefills beside the steps on the CPU too, as a GPU does by default.
               **({"OCR_PREFILL_CONCURRENT": os.environ["OCR_PREFILL_CONCURRENT"]}
                  if "OCR_PREFILL_CONCURRENT" in os.environ else {}), **(settings or {})}
        url = stack.api(workers=2, threads=16)
        started = time.perf_counter()
        worker = Proc([sys.executable, "-m", "bench.service_worker", "worker"], {**stack.env, **env},
                      stack.tmp / "worker.log")
        stack.procs.append(worker)
        stack.wait_worker_ready(worker, timeout=400)
        ready_s = time.perf_counter() - started
        redis_before = redis_calls(stack.redis)
        buf = io.BytesIO()
        a4_page(160 if tiny else 1280).save(buf, format="PNG")
        png = buf.getvalue()
        ids: list[str] = []
        lock = threading.Lock()
        per_client = jobs // clients

        def client() -> None:
            with requests.Session() as s:
                for _ in range(per_client):
                    r = s.post(f"{url}/v1/jobs", files={"file": ("page.png", png)}, timeout=60)
                    r.raise_for_status()
                    with lock:
                        ids.append(r.json()["id"])

        first_submit = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        submitted_s = time.perf_counter() - first_submit

        def final(job_id: str) -> dict:
            return requests.get(f"{url}/v1/jobs/{job_id}", params={"wait": 30}, timeout=40).json()

        results = [wait_until(lambda j=j: (f := final(j))["status"] in ("succeeded", "failed") and f,
                              timeout=900, interval=0.0, message=f"job {j}") for j in ids]
        seconds = time.perf_counter() - first_submit
        redis_used = {name: calls - redis_before.get(name, 0) for name, calls in redis_calls(stack.redis).items()}
        ok = sum(r["status"] == "succeeded" for r in results)
        steady = steady_state([r["finished_at"] for r in results if r.get("finished_at")])
        tokens = metric_totals(requests.get(f"{url}/metrics", timeout=10).text).get("gnosis_output_tokens_total", 0)
        device = metric_totals(requests.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text)
        steps = device.get("gnosis_worker_decode_steps_total", 0)
        decode_s = device.get("gnosis_worker_decode_seconds_total", 0)
        prefill_s = device.get("gnosis_worker_prefill_seconds_total", 0)
        return {"jobs": len(ids), "clients": clients, "succeeded": ok, "seconds": round(seconds, 2),
                "pages_per_s": round(ok / seconds, 3), "steady_pages_per_s": steady,
                "tokens_per_s": round(tokens / seconds, 1),
                "submit_s": round(submitted_s, 2), "worker_ready_s": round(ready_s, 1),
                "slots": int(device.get("gnosis_worker_batch_slots", 0)),
                "mean_batch": round(device.get("gnosis_worker_decode_tokens_total", 0) / max(steps, 1), 1),
                "decode_s": round(decode_s, 1), "ms_per_step": round(1000 * decode_s / max(steps, 1), 2),
                "prefill_s": round(prefill_s, 1),
                "prefill_ms_per_page": round(1000 * prefill_s / max(device.get("gnosis_worker_prefill_pages_total", 0),
                                                                     1), 1),
                "pages_per_prefill": round(device.get("gnosis_worker_prefill_pages_total", 0)
                                           / max(device.get("gnosis_worker_prefills_total", 0), 1), 2),
                "redis_calls_per_page": round(sum(redis_used.values()) / max(ok, 1), 1),
                "redis_top_calls_per_page": {name: round(calls / max(ok, 1), 1) for name, calls in
                                             sorted(redis_used.items(), key=lambda kv: -kv[1])[:8]},
                "failed": [r.get("error") for r in results if r["status"] != "succeeded"][:3]}
    finally:
        stack.stop()
        keep_log(stack.tmp / "worker.log", f"worker_b{batch}.log" if batch else "worker.log")
        stub.stop()
        redis_proc.stop()


def keep_log(path, name: str) -> None:
    """The worker's log (its start-up checks say which path each device kept, and why) copied to
    `GNOSIS_BENCH_LOGS`, where a device call sets it to what comes back from the machine."""
    folder = os.environ.get("GNOSIS_BENCH_LOGS")
    if folder and path.exists():
        import shutil

        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(path, os.path.join(folder, name))


def redis_calls(client) -> dict[str, int]:
    """Commands the stack's own Redis has run, by name, since it started (the API, the worker and this
    benchmark's clients: the service's whole load on Redis)."""
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def steady_state(finished_at: list[str]) -> float | None:
    """Pages/s over the middle of the run (the 10th to the 90th percentile of finish times): the rate
    once the batch is full, without the ramp-up at the start and the tail at the end."""
    from datetime import datetime

    stamps = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in finished_at)
    if len(stamps) < 10:
        return None
    lo, hi = len(stamps) // 10, len(stamps) * 9 // 10
    return round((hi - lo) / max(stamps[hi] - stamps[lo], 1e-6), 3)
