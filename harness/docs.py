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


def noise_pdf(pages: int, size: tuple[int, int], *, resolution: float = 72.0) -> bytes:
    """A scan-like PDF: each page one incompressible image of `size` pixels, so nearly all its bytes are
    page content, and each page's object sits between two images, as in a scanner's output."""
    import os

    images = [Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) for _ in range(pages)]
    buf = io.BytesIO()
    images[0].save(buf, format="PDF", save_all=True, append_images=images[1:], resolution=resolution)
    return buf.getvalue()


def words(text: str) -> set[str]:
    """Normalised words: OCR layout and case differ, the words should not."""
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2}


def png_pixel_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header declaring a huge image, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pdf_with_objects(objects: list[bytes], root: int = 1) -> bytes:
    """A PDF assembled object by object, with a correct xref table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, root, xref)
    return bytes(out)


def pdf_page_tree_loop() -> bytes:
    return pdf_with_objects([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Pages /Kids [2 0 R] /Count 1 /Parent 2 0 R >>",
    ])


def encrypted_pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=300, height=300)
    writer.encrypt(user_password="secret", owner_password="owner")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def squash(text: str) -> str:
    """Lower case with all whitespace and punctuation removed: OCR may join or split words."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _stream(dictionary: bytes, data: bytes) -> bytes:
    import zlib

    packed = zlib.compress(data, 9)
    return dictionary[:-2] + b" /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed) + packed + b"\nendstream"


def pdf_slow_page(strokes: int = 100_000) -> bytes:
    """A 5 KB one-page PDF whose content stream strokes `strokes` lines: seconds to minutes of pdfium."""
    return pdf_with_objects([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 600 800] /Contents 4 0 R >>",
        _stream(b"<< >>", b"0 0 m 500 700 l S\n" * strokes),
    ])


def pdf_embedding_image(width: int, height: int) -> bytes:
    """A one-page PDF drawing one grey image of `width` x `height` pixels (its data is zeros, packed)."""
    return pdf_with_objects([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 600 800] /Resources << /XObject << /Im0 5 0 R >> >> "
        b"/Contents 4 0 R >>",
        _stream(b"<< >>", b"q 600 0 0 800 0 0 cm /Im0 Do Q\n"),
        _stream(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray "
                b"/BitsPerComponent 8 >>" % (width, height), bytes(min(width * height, 4 * 2**20))),
    ])
