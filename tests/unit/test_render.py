"""PDF pages off the happy path: an embedded image bounded like an upload, and, on a batched worker's
threads, a render with a deadline of its own in a process that is replaced when it overruns."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from gnosis_ocr import document
from gnosis_ocr.errors import PageTimeout, UnreadableDocument
from gnosis_ocr.worker.render import PdfRenderer
from harness.docs import pdf_embedding_image, pdf_of_pages, pdf_slow_page
from harness.stack import wait_until


def test_an_image_embedded_in_a_pdf_is_bounded_like_an_uploaded_one():
    with pytest.raises(UnreadableDocument) as caught:
        document.render_page(pdf_embedding_image(4000, 3000), "pdf", 0, max_side=640, max_pixels=10_000_000)
    assert caught.value.code == "too_many_pixels" and "4000x3000" in caught.value.message
    page = document.render_page(pdf_embedding_image(400, 300), "pdf", 0, max_side=640, max_pixels=10_000_000)
    assert max(page.size) == 640


@pytest.fixture
def renderer():
    r = PdfRenderer(processes=2)
    yield r
    r.close()


def test_a_page_that_renders_past_its_deadline_fails_alone_and_the_renderer_is_replaced(renderer):
    good = pdf_of_pages([["rendered in a child process"]])
    expected = document.render_page(good, "pdf", 0, max_side=800, max_pixels=10**8)
    started = time.monotonic()
    with pytest.raises(PageTimeout):
        renderer.render(pdf_slow_page(), 0, max_side=800, max_pixels=10**8, deadline=time.monotonic() + 2)
    assert time.monotonic() - started < 6, "the deadline was not kept"
    # Both renderers take pages again, the killed one replaced.
    for _ in range(3):
        page = renderer.render(good, 0, max_side=800, max_pixels=10**8, deadline=time.monotonic() + 60)
        assert page.size == expected.size and page.tobytes() == expected.tobytes()


def test_a_page_for_tesseract_is_rendered_at_its_dpi_in_gray_in_process_or_in_a_renderer(renderer):
    from gnosis_ocr.worker.engines.tesseract import TesseractEngine

    pdf = pdf_of_pages([["read as a scan"]])  # a US Letter page: 8.5 x 11 inches
    how = {"dpi": TesseractEngine.render_dpi, "grayscale": TesseractEngine.render_grayscale}
    here = document.render_page(pdf, "pdf", 0, max_side=800, max_pixels=10**8, **how)
    there = renderer.render(pdf, 0, max_side=800, max_pixels=10**8, deadline=time.monotonic() + 60, **how)
    assert here.mode == "L" and abs(here.width - 2550) <= 1 and abs(here.height - 3300) <= 1, \
        f"{here.mode} {here.size}: not 300 dpi in gray, whatever the VLM's max side"
    assert (there.mode, there.size, there.tobytes()) == (here.mode, here.size, here.tobytes())


def test_a_slow_page_holds_up_no_other_pdf(renderer):
    """The old process-wide pdfium lock would have made the quick page wait for the slow one."""
    import threading

    outcome: list[BaseException] = []

    def render_slow() -> None:
        try:
            renderer.render(pdf_slow_page(400_000), 0, max_side=800, max_pixels=10**8, deadline=time.monotonic() + 8)
        except PageTimeout as exc:
            outcome.append(exc)

    slow = threading.Thread(target=render_slow)
    slow.start()
    try:
        wait_until(multiprocessing.active_children, timeout=30, message="the slow page's renderer to start")
        started = time.monotonic()
        renderer.render(pdf_of_pages([["quick"]]), 0, max_side=800, max_pixels=10**8, deadline=time.monotonic() + 8)
        assert time.monotonic() - started < 5
        assert slow.is_alive(), "the slow page was still rendering beside it"
    finally:
        slow.join()
    assert outcome, "the slow page should have run into its deadline"


def test_what_a_renderer_refuses_comes_back_as_the_same_error(renderer):
    with pytest.raises(UnreadableDocument) as caught:
        renderer.render(pdf_embedding_image(4000, 3000), 0, max_side=640, max_pixels=10_000_000,
                        deadline=time.monotonic() + 60)
    assert caught.value.code == "too_many_pixels"
