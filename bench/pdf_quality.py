"""The CPU engine on real PDFs, through the running service, against the Tesseract CLI.

  apt-get install libtasn1-doc shared-mime-info   # two manuals Debian ships: prose, code, tables
  OMP_THREAD_LIMIT=1 python -m bench.pdf_quality

The pages with a text layer (the reference) and a real amount of text, in two sets: twelve spread
evenly over the manuals (six from each), the figures reported, and every other such page (37), a
check that what the engine was tuned on the twelve holds on pages it was not. The service (API and
one Tesseract worker process on one thread) reads them as jobs with `pages`; the Tesseract 5 CLI reads
the same pages rendered by pdfium at the service's 1,280 px and at 300 dpi. Word error rate as in
bench/cpu_quality.py (word-level edit distance over the reference's words, case and surrounding
punctuation ignored); pages per second on one core, each measured in this run. About 4 minutes.
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


def pick_pages(path: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(0-based page, text layer) of the pages with a real amount of text, past the cover and not a
    table of contents (dotted leaders make its word count meaningless): prose, code listings and
    tables. First those spread evenly over the manual, then the others."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(path)
    eligible = []
    for index in range(1, len(pdf)):
        text = pdf[index].get_textpage().get_text_range()
        if len(text.split()) >= MIN_WORDS and "Table of Contents" not in text:
            eligible.append((index, text))
    pdf.close()
    step = max(len(eligible) / PAGES_PER_MANUAL, 1)
    spread = [eligible[int(i * step)] for i in range(min(PAGES_PER_MANUAL, len(eligible)))]
    return spread, [page for page in eligible if page not in spread]


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


def through_service(url: str, manuals: dict[str, list[tuple[int, str]]]) -> tuple[list[float], float]:
    errors, seconds = [], 0.0
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
    return errors, seconds


def through_cli(manuals: dict[str, list[tuple[int, str]]], tmp: Path, **options) -> tuple[list[float], float]:
    errors, seconds = [], 0.0
    for path, pages in manuals.items():
        for index, reference in pages:
            image = render(path, index, **options)  # rendering is not counted: the CLI gets an image
            started = time.perf_counter()
            text = cli(image, tmp)
            seconds += time.perf_counter() - started
            errors.append(wer(reference, text))
    return errors, seconds


def summary(errors: list[float], seconds: float) -> dict:
    return {"wer": round(sum(errors) / len(errors), 4), "worst_page_wer": round(max(errors), 4),
            "pages": len(errors), "pages_per_second_per_core": round(len(errors) / seconds, 3)}


def main() -> None:
    missing = [m for m in MANUALS if not os.path.exists(m)]
    if missing or not shutil.which("tesseract"):
        raise SystemExit(f"needs {', '.join(missing) or 'the tesseract CLI'}: apt-get install libtasn1-doc "
                         "shared-mime-info tesseract-ocr")
    picked = {path: pick_pages(path) for path in MANUALS}
    sets = {"reported": {path: spread for path, (spread, _) in picked.items()},
            "check": {path: others for path, (_, others) in picked.items()}}
    tmp = Path(tempfile.mkdtemp(prefix="gnosis-pdf-quality-"))
    results: dict[str, dict[str, dict]] = {name: {} for name in sets}
    for name, options in (("Tesseract 5 CLI at 1,280 px", {"max_side": 1280}),
                          ("Tesseract 5 CLI at 300 dpi", {"dpi": 300})):
        for which, manuals in sets.items():
            results[which][name] = summary(*through_cli(manuals, tmp, **options))
    stack, redis_proc = private_stack()
    stack.env.update(OCR_ENGINE="tesseract", OMP_THREAD_LIMIT="1")
    try:
        url = stack.api()
        stack.worker(concurrency=1)
        for which, manuals in sets.items():
            results[which]["gnosis-ocr service (tesseract engine)"] = summary(*through_service(url, manuals))
    finally:
        stack.stop()
        redis_proc.stop()
    table = [["pages", "reader", "WER (mean)", "worst page", "pages/s on 1 core"]]
    for which, readers in results.items():
        table += [[f"{which} ({r['pages']})", name, r["wer"], r["worst_page_wer"], r["pages_per_second_per_core"]]
                  for name, r in readers.items()]
    report("pdf_quality", {"manuals": MANUALS, "results": results["reported"], "check": results["check"]}, table)


if __name__ == "__main__":
    main()
