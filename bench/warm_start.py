"""Warm start: a worker's model load from a complete shared cache against a bare
`from_pretrained(snapshot_path)` of the same model, in the same run (goal <= 1.2), and the number of
requests that reach the hub (goal 0).

Two views. In-process: ModelCache.ensure_ready (Redis lookup, manifest, quick check) + NanonetsEngine
against AutoProcessor + AutoModelForImageTextToText from the path, alternated, medians. Whole
process: `gnosis-ocr worker` from spawn to "every pool process loaded" against a `python -c` that
imports transformers and loads the same path.

    python bench/warm_start.py [--mb 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # as in a worker: set before anything imports huggingface_hub

from bench.common import ROOT, private_stack, report  # noqa: E402
from harness.hubstub import HubStub  # noqa: E402
from harness.tinymodel import build_tiny_model  # noqa: E402

REPO = "bench-org/warm-ocr"
BARE = ("import sys, transformers as t; p = sys.argv[1]; t.AutoProcessor.from_pretrained(p); "
        "t.AutoModelForImageTextToText.from_pretrained(p)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    model = build_tiny_model(tempfile.mkdtemp(prefix="gnosis-warm-"), pad_mb=args.mb)
    stub = HubStub(REPO, model).start()
    stack, redis_proc = private_stack()
    try:
        stack.env.update(OCR_MODEL_ID=REPO, HF_ENDPOINT=stub.url, OCR_ENGINE="nanonets", OCR_DEVICE="cpu")
        warm = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "cache", "warm"], env=stack.env, cwd=ROOT,
                              capture_output=True, text=True)
        assert warm.returncode == 0, warm.stderr
        stub.reset_counts()

        import redis
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from gnosis_ocr.cache.store import ModelCache
        from gnosis_ocr.settings import Settings
        from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

        settings = Settings.from_env(stack.env)
        client = redis.Redis.from_url(settings.redis_url)
        path = ModelCache(settings, client).ensure_ready()

        def bare() -> None:
            AutoProcessor.from_pretrained(str(path))
            AutoModelForImageTextToText.from_pretrained(str(path))

        def ours() -> None:
            snapshot = ModelCache(settings, client).ensure_ready()
            NanonetsEngine(snapshot, model_id=REPO, revision=snapshot.name, device="cpu")

        bare()
        ours()  # warm the page cache and imports for both
        times = {"bare": [], "ours": []}
        for _ in range(args.repeat):
            for name, fn in (("bare", bare), ("ours", ours)):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
        bare_s, ours_s = statistics.median(times["bare"]), statistics.median(times["ours"])

        # Whole processes, cold imports included.
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", BARE, str(path)], env=stack.env, check=True, capture_output=True)
        bare_proc = time.perf_counter() - started
        started = time.perf_counter()
        worker = stack.spawn("worker", ["worker", "--concurrency=1", "--loglevel=WARNING"])
        stack.wait_worker_ready(worker, timeout=300)
        worker_proc = time.perf_counter() - started

        result = {"model_bytes": stub.model_bytes, "in_process": {
            "bare_s": round(bare_s, 3), "gnosis_s": round(ours_s, 3), "ratio": round(ours_s / bare_s, 2)},
            "process": {"bare_s": round(bare_proc, 2), "worker_ready_s": round(worker_proc, 2),
                        "ratio": round(worker_proc / bare_proc, 2)},
            "hub_requests": len(stub.requests)}
        report("warm_start", result, [
            ["view", "bare from_pretrained(path) s", "gnosis-ocr s", "ratio"],
            ["in-process load (median)", result["in_process"]["bare_s"], result["in_process"]["gnosis_s"],
             result["in_process"]["ratio"]],
            ["whole process to ready", result["process"]["bare_s"], result["process"]["worker_ready_s"],
             result["process"]["ratio"]],
            ["requests to the hub", "", result["hub_requests"], ""],
        ])
    finally:
        stack.stop()
        redis_proc.stop()
        stub.stop()


if __name__ == "__main__":
    main()
