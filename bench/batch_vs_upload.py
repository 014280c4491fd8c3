"""A bucket-to-bucket batch against the same documents uploaded one by one through the API.

  OMP_THREAD_LIMIT=1 python -m bench.batch_vs_upload --documents 1000

One-page PDFs in a GCS API emulator (fake-gcs-server); one stack (API, one Tesseract worker process of
`--concurrency`) reads them twice: uploaded through `POST /v1/jobs` by 4 clients (each result fetched),
then as one batch. Documents per second from the first submission to the last result, and the CPU time
the API's processes spent on each (read from /proc for the API's whole process group).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_THREAD_LIMIT", "1")

import requests  # noqa: E402

from bench.common import private_stack, report  # noqa: E402
from harness.docs import pdf_of_pages  # noqa: E402


def group_cpu_seconds(pgid: int) -> float:
    """User plus system CPU seconds of every process in a process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def uploads(url: str, documents: list[bytes]) -> None:
    def one(item: tuple[int, bytes]) -> None:
        n, data = item
        job = requests.post(f"{url}/v1/jobs", files={"file": (f"d{n}.pdf", data)}, timeout=60).json()
        while requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60).json()["status"] not in (
                "succeeded", "failed"):
            pass
        requests.get(f"{url}/v1/jobs/{job['id']}/result", timeout=60)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, enumerate(documents)))


def batch(url: str) -> dict:
    created = requests.post(f"{url}/v1/batches", json={"source": "gs://bench/in/", "destination": "gs://bench/out/"},
                            timeout=60).json()
    while (state := requests.get(f"{url}/v1/batches/{created['id']}", timeout=60).json())["status"] not in (
            "succeeded", "failed", "cancelled"):
        time.sleep(0.5)  # polling: a batch has no long-poll
    return state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from harness.gcsemulator import start_emulator

    server = start_emulator()
    documents = [pdf_of_pages([[f"Benchmark document {n}", "one page of a larger batch"]])
                 for n in range(args.documents)]
    bucket = storage.Client(project="bench", credentials=AnonymousCredentials()).create_bucket("bench")
    for n, data in enumerate(documents):
        bucket.blob(f"in/d{n:05}.pdf").upload_from_string(data)
    stack, redis_proc = private_stack()
    stack.env.update(OCR_ENGINE="tesseract", OMP_THREAD_LIMIT="1",
                     STORAGE_EMULATOR_HOST=os.environ["STORAGE_EMULATOR_HOST"], GOOGLE_CLOUD_PROJECT="bench",
                     GNOSIS_BATCH_BUCKETS="gs://bench/")
    results = {}
    try:
        url = stack.api()
        api = stack.procs[-1]
        stack.worker(concurrency=args.concurrency)
        for name, run in (("uploaded one by one", lambda: uploads(url, documents)), ("one batch", lambda: batch(url))):
            cpu, started = group_cpu_seconds(api.pid), time.perf_counter()
            outcome = run()
            seconds = time.perf_counter() - started
            results[name] = {"documents_per_s": round(args.documents / seconds, 2), "seconds": round(seconds, 1),
                             "api_cpu_s": round(group_cpu_seconds(api.pid) - cpu, 2)}
            if isinstance(outcome, dict):
                results[name]["batch"] = {k: outcome[k] for k in ("status", "documents_done", "documents_failed")}
    finally:
        stack.stop()
        redis_proc.stop()
        server.stop()
    table = [["how", "documents/s", "seconds", "API CPU seconds"]]
    table += [[name, r["documents_per_s"], r["seconds"], r["api_cpu_s"]] for name, r in results.items()]
    report("batch_vs_upload", {"documents": args.documents, "concurrency": args.concurrency, "results": results},
           table)


if __name__ == "__main__":
    main()
