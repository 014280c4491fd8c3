"""Does the whole service keep a GPU's batch full? The service against the engine alone, both on a
stand-in device with the H200's step and prefill times, on any machine.

The GPU benchmark found the service at 1.84 pages/s where the engine alone made 2.44 (docs/benchmarks.md).
Part of any such gap is the host: the API taking the uploads, Celery handing the worker its messages, a
page's claim, render and image processor on the worker's threads, the result written and acknowledged.
All of that runs here for real, at 1280 px, through `gpu_service.service` (Redis, the API under
gunicorn, a `gnosis-ocr worker` loading its checkpoint through the cache code from a stand-in hub); only
the device's work is simulated (`bench/engine_host.py`'s stand-in, in the worker process). The engine
alone is the same stand-in and scheduler fed by page threads with the same processor, in this process:

    python bench/service_host.py --slots 128 --out docs/results/service_host.json

The ratio (service steady pages/s ÷ engine alone) is what the host costs the GPU's throughput.
`--chunk-ms` gives each prefill a cost whatever its pages, `--gather 0,250` runs both once per
`OCR_PREFILL_GATHER_MS` value, and `--concurrent 0,1` once with prefills on the engine loop's thread and
once beside the steps (`OCR_PREFILL_CONCURRENT`, at `--contention`) (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.engine_host import page_png, run_mode  # noqa: E402
from bench.gpu_engine import MIX, build_processor  # noqa: E402
from bench.gpu_service import service  # noqa: E402


def checkpoint() -> str:
    """The tiny model's weights (never run: the stand-in computes nothing) with Qwen2.5-VL's real
    processor at full resolution, so each page costs the worker what a real page does."""
    from harness.tinymodel import build_tiny_model

    out = build_tiny_model(tempfile.mkdtemp(prefix="nanonets-standin-"))
    build_processor().save_pretrained(out)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--step-ms", default="7.05,8.87", help="a step of 1 and of 64 pages (H200, measured)")
    parser.add_argument("--prefill-ms", type=float, default=60, help="per page (the issue's goal; 159 measured)")
    parser.add_argument("--chunk-ms", type=float, default=0,
                        help="a prefill's cost whatever its pages (the host's launches, reads), beside --prefill-ms")
    parser.add_argument("--gather", default=None,
                        help="OCR_PREFILL_GATHER_MS values, comma-separated: the engine and the service once each "
                             "(default: the worker's own)")
    parser.add_argument("--concurrent", default="0",
                        help="OCR_PREFILL_CONCURRENT off (0) and on (1), comma-separated: a run with each")
    parser.add_argument("--contention", type=float, default=0.5,
                        help="with prefills concurrent: how much they and the steps slow each other, 0 to 1")
    parser.add_argument("--engine-seconds", type=float, default=30, help="the engine alone, once its batch is full")
    parser.add_argument("--redis-url", default=os.environ.get("GNOSIS_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--out")
    args = parser.parse_args()

    from gnosis_ocr.worker.engines.prompt import PagePrompt

    step_ms = tuple(float(x) for x in args.step_ms.split(","))
    report: dict = {"bench": "service_host", "cpus": os.cpu_count(), "slots": args.slots, "step_ms": step_ms,
                    "prefill_ms": args.prefill_ms, "chunk_ms": args.chunk_ms, "mix": MIX, "runs": []}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    from gnosis_ocr import defaults

    path = checkpoint()
    gathers = (args.gather or str(defaults.DEFAULT_PREFILL_GATHER_MS)).split(",")
    for gather, concurrent in ((g, c == "1") for g in gathers for c in args.concurrent.split(",")):
        run: dict = {"gather_ms": float(gather), "concurrent": concurrent,
                     "contention": args.contention if concurrent else None}
        report["runs"].append(run)
        alone = run_mode("pages", prepare=True, overlap=True, switch=None, slots=args.slots, prefetch=4,
                         seconds=args.engine_seconds, step_ms=step_ms, prefill_ms=args.prefill_ms,
                         prompt=PagePrompt(build_processor()), png=page_png(1280), redis_url=args.redis_url,
                         chunk_ms=args.chunk_ms, gather=float(gather) / 1000, concurrent=concurrent,
                         contention=args.contention)
        alone["pages_per_s_at_mix"] = round(alone["output_tokens_per_s"] / (sum(MIX) / len(MIX)), 2)
        run["engine_alone"] = alone
        save()
        started = time.perf_counter()
        spec = f"{step_ms[0]},{step_ms[1]},{args.prefill_ms},{args.chunk_ms},{args.contention}"
        run["service"] = service(path, jobs=args.jobs, clients=args.clients, tiny=False, batch=args.slots,
                                 standin=spec, settings={"OCR_PREFILL_GATHER_MS": gather,
                                                         "OCR_PREFILL_CONCURRENT": "on" if concurrent else "off"})
        run["service"]["wall_s"] = round(time.perf_counter() - started, 1)
        steady = run["service"].get("steady_pages_per_s")
        run["service_over_engine"] = round(steady / alone["pages_per_s_at_mix"], 3) if steady else None
        save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
