"""`gnosis-ocr batch`: read every document under a gs:// prefix into another, optionally waiting with a
progress bar of documents."""

from __future__ import annotations

import argparse
import json
import sys

from .client import ApiError, Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="OCR every PDF and image under a gs:// prefix into another")
    p.add_argument("source", help="gs://bucket/prefix/ to read")
    p.add_argument("destination", help="gs://bucket/prefix/ to write <path>.md and <path>.json under")
    p.add_argument("--wait", action="store_true", help="wait for the batch, then name its failed documents")
    p.add_argument("--pages", default=None, help='only these pages of each document, e.g. "1-3,7"')
    p.add_argument("--language", default=None, help='the CPU engine\'s language(s), e.g. "deu+eng"')
    p.add_argument("--overwrite", action="store_true", help="read documents whose results exist again")
    p.add_argument("--url", default=None, help="API base URL (default $GNOSIS_URL or http://127.0.0.1:8080)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the batch (default: until it ends)")
    p.set_defaults(func=run)


class _Progress:
    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last: tuple | None = None

    def __call__(self, batch: dict) -> None:
        ended = batch["documents_done"] + batch["documents_failed"] + batch["documents_skipped"]
        state = (batch["status"], ended, batch["documents_total"], batch["documents_failed"])
        if state == self.last:
            return
        self.last = state
        status, ended, total, failed = state
        line = f"{ended}/{total} documents ({failed} failed, {batch['documents_skipped']} skipped) {status}"
        if self.tty:
            filled = int(30 * ended / max(total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line:<50}")
            if status in ("succeeded", "failed", "cancelled"):
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    client = Client(args.url)
    try:
        batch = client.submit_batch(args.source, args.destination, pages=args.pages, language=args.language,
                                    overwrite=args.overwrite or None)
    except ApiError as exc:
        print(f"batch rejected ({exc.status} {exc.code}): {exc.message}", file=sys.stderr)
        return EXIT_USAGE if exc.status == 400 else EXIT_FAILED
    if not args.wait:
        print(json.dumps(batch))
        return EXIT_OK
    final = client.wait_batch(batch["id"], timeout=args.timeout, on_progress=_Progress())
    print(json.dumps(final))
    for failure in client.batch_failures(batch["id"]):
        print(f"{failure['name']}: {failure['code']}: {failure['message']}", file=sys.stderr)
    return EXIT_OK if final["status"] == "succeeded" and not final["documents_failed"] else EXIT_FAILED
