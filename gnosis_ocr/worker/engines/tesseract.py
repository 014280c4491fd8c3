"""CPU OCR with Tesseract 5 (LSTM), in process through tesserocr: words with their spaces, about a
page per second per core, and no model download: the English model comes from a package
(Debian's `tesseract-ocr-eng`, found in the usual tessdata folders or at TESSDATA_PREFIX)."""

from __future__ import annotations

import glob
import os

from ...errors import ModelCacheError
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


class TesseractEngine:
    model_id = "tesseract"
    batched = False

    def __init__(self, threads: int = 0) -> None:
        if threads > 0:
            # Tesseract's OpenMP threads otherwise take every core in every pool process.
            os.environ.setdefault("OMP_THREAD_LIMIT", str(threads))
        import tesserocr

        self._api = tesserocr.PyTessBaseAPI(path=tessdata_dir(), lang="eng", psm=tesserocr.PSM.AUTO)
        self.model_revision = tesserocr.tesseract_version().split()[1]

    def recognize(self, page, **_) -> PageText:
        self._api.SetImage(page.convert("RGB"))
        text = self._api.GetUTF8Text()
        # Tesseract separates blocks with blank lines; one line per text line reads as the page does.
        return PageText("\n".join(line.strip() for line in text.splitlines() if line.strip()))
