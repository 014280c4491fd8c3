"""The engines themselves: the real transformers path on a tiny Qwen2.5-VL, and RapidOCR."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from harness.docs import squash, text_image
from harness.stack import ROOT


def test_nanonets_engine_generates_with_a_real_qwen25vl(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    engine = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=8)
    try:
        assert type(engine.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert type(engine.processor).__name__ == "Qwen2_5_VLProcessor"
        page = Image.open(io.BytesIO(text_image(["two"], size=(600, 800))))
        result = engine.recognize(page)
        assert isinstance(result.text, str) and 0 < result.tokens <= 8
        # Greedy decoding: the same page gives the same text.
        assert engine.recognize(page) == result or engine.recognize(page).text == result.text
    finally:
        engine.close()


def test_nanonets_prompt_follows_the_model_card(tiny_model):
    from gnosis_ocr.worker.engines.prompt import PROMPT

    assert PROMPT.startswith("Extract the text from the above document as if you were reading it naturally.")
    assert "<page_number>" in PROMPT and "☐" in PROMPT


def test_rapidocr_reads_lines_in_order():
    from gnosis_ocr.worker.engines.rapidocr import RapidOcrEngine

    page = Image.open(io.BytesIO(text_image(["First line here", "Second line there"])))
    text = RapidOcrEngine().recognize(page).text
    lines = [squash(line) for line in text.splitlines()]
    assert lines == ["firstlinehere", "secondlinethere"], text


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_tesseract_reads_the_sample_word_for_word(scale):
    from gnosis_ocr.worker.engines.tesseract import TesseractEngine

    page = Image.open(ROOT / "samples" / "letter.png")
    page = page.resize((int(page.width * scale), int(page.height * scale)))
    assert TesseractEngine(threads=1).recognize(page).text.splitlines() == [
        "GNOSIS OCR SAMPLE LETTER",
        "Invoice number 4821 dated 12 March 2026",
        "Total amount due: 1,250.00 EUR",
        "Thank you for your business.",
    ]


def test_tesseract_without_its_model_says_what_to_install(monkeypatch, tmp_path):
    from gnosis_ocr.errors import GnosisError
    from gnosis_ocr.worker.engines import tesseract

    monkeypatch.setattr(tesseract, "TESSDATA_DIRS", ())
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))
    with pytest.raises(GnosisError) as missing:
        tesseract.tessdata_dir()
    assert "tesseract-ocr-eng" in missing.value.message
