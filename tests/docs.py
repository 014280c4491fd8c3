"""Documents the tests build themselves: printed text with Pillow, PDFs with pypdfium2/Pillow."""

from __future__ import annotations

import io
import re

from PIL import Image, ImageDraw, ImageFont


def text_image(lines: list[str], *, size: tuple[int, int] = (1000, 400), fmt: str = "PNG",
               font_size: int = 40) -> bytes:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    y = 30
    for line in lines:
        draw.text((40, y), line, fill="black", font=font)
        y += int(font_size * 1.6)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pdf_of_pages(pages: list[list[str]]) -> bytes:
    images = [Image.open(io.BytesIO(text_image(lines, size=(850, 1100)))).convert("RGB") for lines in pages]
    buf = io.BytesIO()
    images[0].save(buf, format="PDF", save_all=True, append_images=images[1:], resolution=100.0)
    return buf.getvalue()


def words(text: str) -> set[str]:
    """Normalised words: OCR layout and case differ, the words should not."""
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2}
