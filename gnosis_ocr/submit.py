"""`gnosis-ocr submit`: send documents, optionally wait with a progress bar, print or write results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .client import ApiError, Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="submit documents and optionally wait for their results")
    p.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG, TIFF, WebP, BMP or PDF, read by content")
    p.add_argument("--wait", action="store_true", help="wait for each job and print its result")
    p.add_argument("--format", choices=["json", "markdown"], default="markdown",
                   help="how a result is printed or written (default: markdown)")
    p.add_argument("--url", default=None, help="API base URL (default $GNOSIS_URL or http://127.0.0.1:8080)")
    p.add_argument("--out", type=Path, default=None, help="write each result to DIR/<name>.md or .json")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for each job (default: until it ends)")
    p.add_argument("--pages", default=None, help='only these pages of each document, e.g. "1-3,7"')
    p.add_argument("--language", default=None, help='the CPU engine\'s language(s), e.g. "deu+eng"')
    p.add_argument("--callback-url", default=None,
                   help="where the API POSTs each job, signed, once it is final (docs/api.md)")
    p.set_defaults(func=run)


class _Progress:
    """A bar on a terminal; one plain line per change otherwise (logs, CI)."""

    def __init__(self, name: str, stream=sys.stderr) -> None:
        self.name = name
        self.stream = stream
        self.tty = stream.isatty()
        self.last: tuple | None = None

    def __call__(self, job: dict) -> None:
        state = (job["status"], job["pages_done"], job["pages_total"])
        if state == self.last:
            return
        self.last = state
        status, done, total = state
        if self.tty:
            filled = int(30 * done / max(total, 1))
            self.stream.write(f"\r{self.name}: [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {status:<10}")
            if status in ("succeeded", "failed", "cancelled"):
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.name}: {status} {done}/{total} pages\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    client = Client(args.url)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"gnosis-ocr: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    worst = EXIT_OK
    jobs = []
    for name in args.files:
        try:
            job = client.submit(name, pages=args.pages, language=args.language, callback_url=args.callback_url)
        except ApiError as exc:
            print(f"{name}: rejected ({exc.status} {exc.code}): {exc.message}", file=sys.stderr)
            worst = EXIT_FAILED
            continue
        jobs.append((name, job))
        if not args.wait:
            print(json.dumps(job))
    if not args.wait:
        return worst
    for name, job in jobs:
        final = client.wait(job["id"], timeout=args.timeout, on_progress=_Progress(Path(name).name))
        if final["status"] != "succeeded":
            error = final.get("error") or {}
            print(f"{name}: {final['status']} {error.get('code', '')}: {error.get('message', '')}".rstrip(": "),
                  file=sys.stderr)
            worst = EXIT_FAILED
            continue
        markdown = args.format == "markdown"
        result = client.result(job["id"], markdown=markdown)
        body = result if markdown else json.dumps(result, indent=2, ensure_ascii=False)
        if args.out:
            target = args.out / (Path(name).stem + (".md" if markdown else ".json"))
            target.write_text(body + ("" if body.endswith("\n") else "\n"), encoding="utf-8")
            print(f"{name}: wrote {target}", file=sys.stderr)
        else:
            print(body)
    return worst
