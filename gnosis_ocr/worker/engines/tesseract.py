"""CPU OCR with Tesseract 5 (LSTM), in process through tesserocr: words with their spaces, about a
page per second per core, and no model download: the English model comes from a package
(Debian's `tesseract-ocr-eng`, found in the usual tessdata folders or at TESSDATA_PREFIX)."""

from __future__ import annotations

import glob
import os

from ...errors import BadRequest, ModelCacheError
from . import PageText

TESSDATA_DIRS = ("/usr/share/tesseract-ocr/*/tessdata", "/usr/share/tessdata", "/usr/local/share/tessdata",
                 "/opt/homebrew/share/tessdata")


def tessdata_dir() -> str:
    """Where `eng.traineddata` is: TESSDATA_PREFIX first, then the distributions' own folders."""
    candidates = [os.environ["TESSDATA_PREFIX"]] if os.environ.get("TESSDATA_PREFIX") else []
    for pattern in TESSDATA_DIRS:
        candidates += sorted(glob.glob(pattern), reverse=True)  # the newest tesseract's folder first
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "eng.traineddata")):
            return folder
    raise ModelCacheError("Tesseract's English model (eng.traineddata) was not found: install Debian's "
                          "tesseract-ocr-eng (or your distribution's equivalent) or set TESSDATA_PREFIX.",
                          code="engine_unavailable")


def installed_languages() -> list[str]:
    """The languages Tesseract can read here (its `.traineddata` models), without loading any."""
    try:
        folder = tessdata_dir()
    except ModelCacheError:
        return []
    return sorted(name[:-len(".traineddata")] for name in os.listdir(folder)
                  if name.endswith(".traineddata") and name != "osd.traineddata")


DEFAULT_LANGUAGE = "eng"

SOURCE_RESOLUTION = 150
"""The resolution Tesseract is told a page has. It sizes the noise and text-height thresholds of page
segmentation, and the true 300 dpi of a rendered page splits some layouts badly. On the real PDFs of
bench/pdf_quality.py, 150 reads best of 70 (what its CLI assumes for an image that names none), 100,
120, 150, 200 and 300, on the 12 pages it reports and on the 37 other pages it checks them against."""
MAX_LOADED_LANGUAGES = 4
"""Tesseract models kept loaded per process (each takes tens of MB); the least recently used goes."""


class TesseractEngine:
    model_id = "tesseract"
    batched = False
    render_dpi = 300
    """PDF pages are rendered for Tesseract at the resolution it reads best, and images reach it unscaled
    (GNOSIS_PAGE_MAX_SIDE is the VLM's token budget): on the real PDFs of bench/pdf_quality.py the CLI
    reads 5.9% WER at 300 dpi against 9.3% at 1,280 px."""
    render_grayscale = True
    """pdfium's gray rendering anti-aliases glyphs differently from its colour one, and Tesseract reads it
    better (bench/pdf_quality.py) and faster: it binarises the page anyway, with no colour to drop."""
    slots = 1
    devices = {"cpu": 1}

    def __init__(self, threads: int = 0) -> None:
        if threads > 0:
            # Tesseract's OpenMP threads otherwise take every core in every pool process.
            os.environ.setdefault("OMP_THREAD_LIMIT", str(threads))
        import tesserocr

        self._folder = tessdata_dir()
        self._apis: dict[str, object] = {}
        self._api_for(DEFAULT_LANGUAGE)
        self.model_revision = tesserocr.tesseract_version().split()[1]

    def _api_for(self, language: str):
        import tesserocr

        api = self._apis.pop(language, None)
        if api is None:
            missing = [code for code in language.split("+")
                       if not os.path.exists(os.path.join(self._folder, f"{code}.traineddata"))]
            if missing:
                raise BadRequest(f"language {'+'.join(missing)} is not installed on this worker; installed: "
                                 f"{', '.join(installed_languages())}.", code="unsupported_language")
            api = tesserocr.PyTessBaseAPI(path=self._folder, lang=language, psm=tesserocr.PSM.AUTO)
            if len(self._apis) >= MAX_LOADED_LANGUAGES:
                oldest = next(iter(self._apis))
                self._apis.pop(oldest).End()
        self._apis[language] = api  # most recently used last
        return api

    def recognize(self, page, *, language: str | None = None, **_) -> PageText:
        api = self._api_for(language or DEFAULT_LANGUAGE)
        api.SetImage(page if page.mode in ("L", "RGB") else page.convert("RGB"))
        api.SetSourceResolution(SOURCE_RESOLUTION)
        text = api.GetUTF8Text()
        # Tesseract separates blocks with blank lines; one line per text line reads as the page does.
        return PageText("\n".join(line.strip() for line in text.splitlines() if line.strip()))
