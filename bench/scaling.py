"""Scaling: pages per second of a 20-page PDF with the `rapidocr` engine on 1 and on 2 worker
processes, one core each (OCR_THREADS=1). Goal: >= 1.8x on 2 cores.

    python bench/scaling.py [--pages 20]
"""

from __future__ import annotations

import argparse
import time

import requests

from bench.common import private_stack, report
from harness.docs import pdf_of_pages


def run(processes: int, pdf: bytes) -> tuple[float, int]:
    stack, redis_proc = private_stack()
    try:
        stack.env.update(OCR_ENGINE="rapidocr", OCR_THREADS="1")  # one core per process: scaling by processes
        url = stack.api()
        worker = stack.spawn("worker", ["worker", f"--concurrency={processes}", "--loglevel=WARNING"])
        stack.wait_worker_ready(worker)  # every pool process has its model loaded before the clock starts
        started = time.perf_counter()
        response = requests.post(f"{url}/v1/jobs", files={"file": ("doc.pdf", pdf)})
        assert response.status_code == 202, response.text
        job = response.json()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            job = requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30}).json()
        seconds = time.perf_counter() - started
        assert job["status"] == "succeeded", job
        return seconds, job["pages_total"]
    finally:
        stack.stop()
        redis_proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=20)
    args = parser.parse_args()
    pdf = pdf_of_pages([[f"Page {n} of the scaling benchmark", "The quick brown fox jumps over the lazy dog",
                         f"Invoice {1000 + n} total {n * 17} EUR"] for n in range(1, args.pages + 1)])
    one, pages = run(1, pdf)
    two, _ = run(2, pdf)
    result = {"pages": pages, "one_process_s": round(one, 2), "two_processes_s": round(two, 2),
              "one_pages_per_s": round(pages / one, 3), "two_pages_per_s": round(pages / two, 3),
              "speedup": round(one / two, 2)}
    report("scaling", result, [
        ["worker processes", "seconds", "pages/s"],
        [1, result["one_process_s"], result["one_pages_per_s"]],
        [2, result["two_processes_s"], result["two_pages_per_s"]],
        ["speedup", result["speedup"], ""],
    ])


if __name__ == "__main__":
    main()
