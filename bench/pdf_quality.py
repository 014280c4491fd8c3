"""Issue 20: the CPU engine on real PDFs, through the running service, against the Tesseract CLI.

  apt-get install libtasn1-doc shared-mime-info   # two manuals Debian ships: prose, code, tables
  OMP_THREAD_LIMIT=1 python -m bench.pdf_quality

Twelve pages with a text layer (six from each manual); the text layer is the reference. The service
(API and one Tesseract worker process on one thread) reads them as jobs with `pages`; the Tesseract 5
CLI reads the same pages rendered by pdfium at the service's 1,280 px and at 300 dpi. Word error rate
as in bench/cpu_quality.py (word-level edit distance over the reference's words, case and surrounding
punctuation ignored); pages per second on one core, each measured in this run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_THREAD_LIMIT", "1")

import requests  # noqa: E402

from bench.common import private_stack, report  # noqa: E402
from bench.cpu_quality import wer  # noqa: E402

MANUALS = ["/usr/share/doc/libtasn1-doc/libtasn1.pdf", "/usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf"]
PAGES_PER_MANUAL = 6
MIN_WORDS = 120


def pick_pages(path: str) -> list[tuple[int, str]]:
    """(0-based page, text layer) of pages spread evenly over the manual among those with a real amount
    of text, past the cover and not a table of contents (dotted leaders make its word count
    meaningless): prose, code listings and tables."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(path)
    eligible = []
    for index in range(1, len(pdf)):
        text = pdf[index].get_textpage().get_text_range()
        if len(text.split()) >= MIN_WORDS and "Table of Contents" not in text:
            eligible.append((index, text))
    pdf.close()
    step = max(len(eligible) / PAGES_PER_MANUAL, 1)
    return [eligible[int(i * step)] for i in range(min(PAGES_PER_MANUAL, len(eligible)))]


def render(path: str, index: int, *, max_side: int | None = None, dpi: int | None = None):
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(path)
    page = pdf[index]
    width, height = page.get_size()
    scale = dpi / 72 if dpi else max_side / max(width, height)
    image = page.render(scale=scale).to_pil().convert("RGB")
    pdf.close()
    return image


def cli(image, tmp: Path) -> str:
    target = tmp / "page.png"
    image.save(target)
    return subprocess.run(["tesseract", str(target), "stdout"], capture_output=True, text=True, check=True).stdout


def through_service(manuals: dict[str, list[tuple[int, str]]]) -> tuple[list[float], float]:
    errors, seconds = [], 0.0
    stack, redis_proc = private_stack()
    stack.env.update(OCR_ENGINE="tesseract", OMP_THREAD_LIMIT="1")
    try:
        url = stack.api()
        stack.worker(concurrency=1)
        for path, pages in manuals.items():
            data = Path(path).read_bytes()
            started = time.perf_counter()
            job = requests.post(f"{url}/v1/jobs", files={"file": (Path(path).name, data)},
                                data={"pages": ",".join(str(i + 1) for i, _ in pages)}, timeout=60).json()
            while (state := requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60).json()
                   )["status"] not in ("succeeded", "failed"):
                pass
            seconds += time.perf_counter() - started
            assert state["status"] == "succeeded", state
            result = requests.get(f"{url}/v1/jobs/{job['id']}/result", timeout=60).json()
            errors += [wer(reference, page["text"]) for (_, reference), page in zip(pages, result["pages"], strict=True)]
    finally:
        stack.stop()
        redis_proc.stop()
    return errors, seconds


def main() -> None:
    missing = [m for m in MANUALS if not os.path.exists(m)]
    if missing or not shutil.which("tesseract"):
        raise SystemExit(f"needs {', '.join(missing) or 'the tesseract CLI'}: apt-get install libtasn1-doc "
                         "shared-mime-info tesseract-ocr")
    manuals = {path: pick_pages(path) for path in MANUALS}
    count = sum(len(p) for p in manuals.values())
    tmp = Path(tempfile.mkdtemp(prefix="gnosis-pdf-quality-"))
    results = {}
    for name, options in (("Tesseract 5 CLI at 1,280 px", {"max_side": 1280}), ("Tesseract 5 CLI at 300 dpi", {"dpi": 300})):
        errors, seconds = [], 0.0
        for path, pages in manuals.items():
            for index, reference in pages:
                image = render(path, index, **options)  # rendering is not counted: the CLI gets an image
                started = time.perf_counter()
                text = cli(image, tmp)
                seconds += time.perf_counter() - started
                errors.append(wer(reference, text))
        results[name] = errors, seconds
    results["gnosis-ocr service (tesseract engine)"] = through_service(manuals)
    out = {name: {"wer": round(sum(e) / len(e), 4), "worst_page_wer": round(max(e), 4),
                  "pages_per_second_per_core": round(len(e) / s, 3)} for name, (e, s) in results.items()}
    table = [["reader", f"WER (mean of {count} pages)", "worst page", "pages/s on 1 core"]]
    table += [[name, r["wer"], r["worst_page_wer"], r["pages_per_second_per_core"]] for name, r in out.items()]
    report("pdf_quality", {"pages": count, "manuals": MANUALS, "results": out}, table)


if __name__ == "__main__":
    main()
