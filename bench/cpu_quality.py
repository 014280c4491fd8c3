"""The CPU engines' word error rate and pages per second per core, against Tesseract 5's CLI.

  OMP_THREAD_LIMIT=1 python -m bench.cpu_quality

Pages are rendered here, so the reference text is exact: multi-paragraph prose and a table, in
DejaVu Sans, Serif and Mono at three sizes, on an A4-shaped page at the service's resolution (the
longest side GNOSIS_PAGE_MAX_SIDE, 1280 px). Each engine runs on one thread. Word error rate is the
word-level edit distance over the reference's word count, case and surrounding punctuation ignored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_THREAD_LIMIT", "1")

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from bench.common import report  # noqa: E402

PROSE = """The committee met on Tuesday morning to review the quarterly figures. Revenue from the northern
region grew by eleven percent, while the coastal offices reported a small decline after the storms in
August. Several members asked whether the new warehouse would open before the winter season; the
operations manager explained that the inspection had been delayed by two weeks but that staff were
already being trained. A proposal to replace the old accounting system was discussed at length. Its
supporters argued that the current software could no longer handle the volume of invoices, and that
errors in reconciliation had cost the company time and money. Others worried about the expense and
the disruption of moving years of records. It was agreed that a small group would visit two vendors
and report back with a recommendation by the end of next month. The meeting closed with thanks to the
volunteers who organised the charity run, which raised more than four thousand pounds for the local
hospital."""

TABLE = [("Item", "Quantity", "Unit price", "Total"),
         ("Paper, A4 ream", "12", "4.50", "54.00"),
         ("Printer toner", "3", "61.20", "183.60"),
         ("Desk lamp", "5", "18.75", "93.75"),
         ("Filing cabinet", "1", "129.00", "129.00"),
         ("Stapler, heavy duty", "4", "11.30", "45.20")]

FONTS = {"sans": "DejaVuSans.ttf", "serif": "DejaVuSerif.ttf", "mono": "DejaVuSansMono.ttf"}
SIZES = (14, 18, 22)
PAGE = (905, 1280)


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
        path = Path(folder) / FONTS[name]
        if path.exists():
            return ImageFont.truetype(str(path), size)
    raise SystemExit("DejaVu fonts are needed (Debian: fonts-dejavu-core)")


def render(font_name: str, size: int) -> tuple[Image.Image, str]:
    font = _font(font_name, size)
    image = Image.new("L", PAGE, 255)
    draw = ImageDraw.Draw(image)
    margin, y = 60, 60
    chars = int((PAGE[0] - 2 * margin) / (font.getlength("x") * 1.05))
    words: list[str] = []
    for paragraph in PROSE.split(". ")[:8]:
        for line in textwrap.wrap(paragraph.replace("\n", " ") + ".", chars):
            draw.text((margin, y), line, font=font, fill=0)
            words += line.split()
            y += int(size * 1.5)
        y += size
        if y > PAGE[1] * 0.6:
            break
    column = (PAGE[0] - 2 * margin) // 4
    for row in TABLE:
        for i, cell in enumerate(row):
            draw.text((margin + i * column, y), cell, font=font, fill=0)
            words += cell.split()
        y += int(size * 1.6)
    return image, " ".join(words)


def normalise(text: str) -> list[str]:
    return [w for w in (t.strip(".,;:!?()\"'").lower() for t in text.split()) if w]


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalise(reference), normalise(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / max(len(ref), 1)


def tesseract_cli(image: Image.Image, tmp: Path) -> str:
    path = tmp / "page.png"
    image.save(path)
    return subprocess.run(["tesseract", str(path), "stdout"], capture_output=True, text=True, check=True).stdout


def main() -> None:
    from gnosis_ocr.worker.engines.rapidocr import RapidOcrEngine
    from gnosis_ocr.worker.engines.tesseract import TesseractEngine

    pages = [render(font, size) for font in FONTS for size in SIZES]
    tmp = Path(tempfile.mkdtemp(prefix="gnosis-quality-"))
    engines = {"tesseract (engine)": TesseractEngine(threads=1).recognize,
               "rapidocr (engine)": RapidOcrEngine(threads=1).recognize}
    runs = {name: (lambda img, fn=fn: fn(img).text) for name, fn in engines.items()}
    if shutil.which("tesseract"):
        runs["Tesseract 5 CLI (baseline)"] = lambda img: tesseract_cli(img, tmp)
    results = {}
    for name, run in runs.items():
        run(pages[0][0])  # warm-up: models loaded, caches filled
        started = time.perf_counter()
        errors = [wer(reference, run(image)) for image, reference in pages]
        seconds = time.perf_counter() - started
        results[name] = {"wer": round(sum(errors) / len(errors), 4), "worst_page_wer": round(max(errors), 4),
                         "pages_per_second_per_core": round(len(pages) / seconds, 2)}
    table = [["engine", "WER (mean of 9 pages)", "worst page", "pages/s on 1 core"]]
    table += [[name, r["wer"], r["worst_page_wer"], r["pages_per_second_per_core"]] for name, r in results.items()]
    report("cpu_quality", {"pages": len(pages), "results": results}, table)


if __name__ == "__main__":
    main()
