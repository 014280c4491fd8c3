"""How fast a batch's listing makes jobs against a bucket with a real bucket's latency, by the number of
documents one listing inspects at once (GNOSIS_LISTING_THREADS).

  python -m bench.batch_listing --documents 300 --latency 0.03 --threads 1,8
  python -m bench.batch_listing --documents 40 --scanned 8 --latency 0.03 --threads 1,8

One-page PDFs (or, with `--scanned N`, scan-like PDFs of N pages of 1.2 MB each, read by ranges as
every PDF over gcs.WHOLE_BELOW is) in a GCS API emulator behind a proxy that adds `--latency` seconds
to every request (the emulator answers in about a millisecond; GCS in tens). A light worker alone lists the batch: each
document costs a few requests (is its result there, what is it, how many pages), then a job. Documents
per second from the batch's submission until every job is made, one fresh batch per thread count, in
one command, so the ratio to `--threads 1` is the measure.
"""

from __future__ import annotations

import argparse
import os
import time

import requests

from bench.common import private_stack, report
from harness.docs import noise_pdf, pdf_of_pages
from harness.flakybucket import FlakyBucket
from harness.stack import wait_until


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--latency", type=float, default=0.03)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--scanned", type=int, default=0, help="pages of noise per document (about 1.2 MB each)")
    args = parser.parse_args()
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from gnosis_ocr import keys
    from harness.gcsemulator import start_emulator

    server = start_emulator()
    bucket = storage.Client(project="bench", credentials=AnonymousCredentials()).create_bucket("bench")
    if args.scanned:  # a 150 dpi letter page of noise each: 1.2 MB a page
        data = noise_pdf(args.scanned, (1275, 1650), resolution=150.0)
    else:
        data = pdf_of_pages([["Listed document", "one page of a batch"]])
    for n in range(args.documents):
        bucket.blob(f"in/d{n:05}.pdf").upload_from_string(data)
    proxy = FlakyBucket(os.environ["STORAGE_EMULATOR_HOST"], latency=args.latency)
    stack, redis_proc = private_stack()
    stack.env.update(STORAGE_EMULATOR_HOST=proxy.url, GOOGLE_CLOUD_PROJECT="bench", GNOSIS_BATCH_BUCKETS="gs://bench/")
    results = {}
    try:
        url = stack.api()
        for threads in (int(t) for t in args.threads.split(",")):
            lister = stack.spawn("light", ["worker", "--light", "--concurrency=1"], GNOSIS_LISTING_THREADS=str(threads))
            sent = len(proxy.seen)
            started = time.perf_counter()
            batch = requests.post(f"{url}/v1/batches", json={"source": "gs://bench/in/",
                                                             "destination": f"gs://bench/out-{threads}/"}).json()
            wait_until(lambda: stack.redis.scard(keys.batch_jobs(batch["id"])) == args.documents, timeout=1800,
                       interval=0.1, message="every document's job")
            seconds = time.perf_counter() - started
            results[threads] = {"documents_per_s": round(args.documents / seconds, 2), "seconds": round(seconds, 2),
                                "requests_per_document": round((len(proxy.seen) - sent) / args.documents, 2)}
            lister.sigterm(timeout=60)
    finally:
        stack.stop()
        redis_proc.stop()
        proxy.stop()
        server.stop()
    base = next(iter(results.values()))["documents_per_s"]
    table = [["listing threads", "documents/s", "seconds", "requests/document", "× threads=1"]]
    table += [[t, r["documents_per_s"], r["seconds"], r["requests_per_document"], round(r["documents_per_s"] / base, 2)]
              for t, r in results.items()]
    report("batch_listing_scanned" if args.scanned else "batch_listing",
           {"documents": args.documents, "document_bytes": len(data), "latency_s": args.latency, "results": results},
           table)


if __name__ == "__main__":
    main()
