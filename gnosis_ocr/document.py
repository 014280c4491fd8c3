"""Recognise, check and render uploaded documents. Light enough for the API process."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

from .errors import UnreadableDocument, UnsupportedDocument

# pdfium keeps global state and is not thread-safe; the API serves requests on threads.
_PDFIUM_LOCK = threading.Lock()

MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "tiff": "image/tiff",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "pdf": "application/pdf",
}


@dataclass(frozen=True)
class DocumentInfo:
    kind: str
    pages: int

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.kind]


def sniff(head: bytes) -> str | None:
    """The document kind from its first bytes, whatever its name or declared type."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    # PDF readers accept the header anywhere in the first KiB.
    if b"%PDF-" in head[:1024]:
        return "pdf"
    return None


def inspect(data: bytes | BinaryIO, *, max_pages: int, max_pixels: int) -> DocumentInfo:
    """Check that `data` is a supported, readable document within limits, without rendering it. `data`
    is the document's bytes or a seekable binary file of them, of which only what the check needs is
    read (a PDF's page tree, not its content)."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    stream.seek(0)
    head = stream.read(1024)
    if not head:
        raise UnsupportedDocument("The file is empty.", code="empty_document")
    kind = sniff(head)
    if kind is None:
        raise UnsupportedDocument("The file is not a PNG, JPEG, TIFF, WebP, BMP or PDF document.")
    if kind == "pdf":
        stream.seek(0)
        pages = _pdf_pages(data if isinstance(data, bytes) else stream, max_pages=max_pages)
    else:
        pages = _image_pages(stream, max_pixels=max_pixels, max_pages=max_pages)
    if pages == 0:
        raise UnreadableDocument("The document has no pages.", code="no_pages")
    if pages > max_pages:
        raise UnreadableDocument(
            f"The document has more than {max_pages} pages; at most {max_pages} are accepted.",
            code="too_many_pages",
        )
    return DocumentInfo(kind=kind, pages=pages)


def render_page(data: bytes, kind: str, index: int, *, max_side: int, max_pixels: int,
                dpi: int | None = None, grayscale: bool = False) -> Image.Image:
    """Page `index` (0-based) as an RGB image whose longest side is at most `max_side` pixels, or, with
    `dpi` (an engine that reads pages as scanned, such as Tesseract), a PDF page at that resolution
    and an image as it is; `max_pixels` bounds both. `grayscale` renders a PDF page in gray (mode L)."""
    if kind == "pdf":
        return render_pdf_page(data, index, max_side=max_side, max_pixels=max_pixels, dpi=dpi, grayscale=grayscale)
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img, max_pixels)
            img.seek(index)
            img.load()
            page = img.convert("RGB")
    except UnreadableDocument:
        raise
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableDocument(f"Page {index + 1} cannot be decoded: {exc}") from None
    if dpi is None:
        page.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return page


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise UnreadableDocument(
            f"The image is {width}x{height} pixels; at most {max_pixels} pixels are accepted.",
            code="too_many_pixels",
        )


def _image_pages(stream: BinaryIO, *, max_pixels: int, max_pages: int) -> int:
    """Frames counted one by one, stopping at `max_pages` + 1: Pillow's `n_frames` would walk every
    frame of a 100,000-frame TIFF before the limit could be checked."""
    # The header alone gives the size, so a pixel bomb is refused before anything is decoded.
    frames = 1
    try:
        stream.seek(0)
        with Image.open(stream) as img:
            _check_pixels(img, max_pixels)
            while frames <= max_pages:
                try:
                    img.seek(frames)
                except EOFError:
                    break
                frames += 1
                _check_pixels(img, max_pixels)
    except UnreadableDocument:
        raise
    except Image.DecompressionBombError:
        raise UnreadableDocument("The image has too many pixels.", code="too_many_pixels") from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise UnreadableDocument(f"The image cannot be read: {exc}") from None
    if frames == 1:
        _verify_image(stream)
    return frames


def _verify_image(stream: BinaryIO) -> None:
    # verify() walks the stream (PNG chunk CRCs, truncation) without a full decode.
    try:
        stream.seek(0)
        with Image.open(stream) as img:
            img.verify()
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise UnreadableDocument(f"The image is corrupt: {exc}") from None


def _open_pdf(data: bytes | BinaryIO):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise UnreadableDocument("The PDF is encrypted.", code="encrypted_document") from None
        raise UnreadableDocument(f"The PDF cannot be read: {exc}") from None


def _pdf_pages(data: bytes | BinaryIO, *, max_pages: int) -> int:
    """The page count, checked against the pages that exist: a page tree may claim /Count 100 with one
    real page, and each claimed page would otherwise become a task."""
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        pdf = _open_pdf(data)
        try:
            pages = len(pdf)
            if pages > max_pages:
                return pages
            for index in range(pages):
                try:
                    pdf.get_page_size(index)  # reads the page's dictionary, never its content
                except pdfium.PdfiumError:
                    if getattr(data, "incomplete", False):
                        continue  # a read ahead (gcs.RangedReader): learn every page's blocks, then they come
                    raise UnreadableDocument(
                        f"The PDF says it has {pages} pages but page {index + 1} does not exist.") from None
            return pages
        finally:
            pdf.close()


def render_pdf_page(data: bytes, index: int, *, max_side: int, max_pixels: int, dpi: int | None = None,
                    grayscale: bool = False) -> Image.Image:
    """A PDF page at `max_side`, or at `dpi` within `max_pixels`, in RGB or, with `grayscale`, rendered
    by pdfium in gray (its own anti-aliasing, not a conversion). Images embedded in it are bounded like
    uploaded images: pdfium decodes each in full before scaling it down, so one 60,000 × 60,000 JPEG in
    a small page is gigabytes."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    with _PDFIUM_LOCK:
        pdf = _open_pdf(data)
        try:
            page = pdf[index]
            for image in page.get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_IMAGE,)):  # form XObjects included
                w, h = image.get_px_size()
                if w * h > max_pixels:
                    raise UnreadableDocument(
                        f"Page {index + 1} embeds a {w}x{h} image; at most {max_pixels} pixels are accepted.",
                        code="too_many_pixels")
            width, height = page.get_size()  # PDF points
            if dpi is None:
                scale = max_side / max(width, height, 1.0)
            else:  # points are 1/72 inch; a huge page is rendered smaller rather than refused
                scale = min(dpi / 72, (max_pixels / max(width * height, 1.0)) ** 0.5)
            bitmap = page.render(scale=scale, grayscale=grayscale)
            return bitmap.to_pil().convert("L" if grayscale else "RGB")
        except pdfium.PdfiumError as exc:
            raise UnreadableDocument(f"Page {index + 1} of the PDF cannot be rendered: {exc}") from None
        finally:
            pdf.close()
