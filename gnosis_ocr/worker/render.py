"""PDF pages rendered in child processes, each render with a deadline of its own.

A prefork worker's page runs in its own process under Celery's hard time limit. A batched (GPU) worker
runs every page on a thread of one process, where Celery enforces no time limit and pdfium (not
thread-safe) renders under one process-wide lock: one pathological page (a deep content stream, a
huge embedded image) would hold every other page's render for as long as it takes. Here each render
goes to one of a few renderer processes (spawned, not forked: the parent holds a CUDA context); a
render past its deadline has its process killed and replaced, and the page fails alone with `timeout`.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection

from PIL import Image

from ..errors import GnosisError, PageTimeout, UnreadableDocument

log = logging.getLogger(__name__)


def _serve(conn: Connection) -> None:
    """A renderer process: one page at a time, answered as (True, image) or (False, (code, message))."""
    from .. import document

    while True:
        try:
            data, index, max_side, max_pixels, dpi, grayscale = conn.recv()
        except (EOFError, OSError):
            return
        try:
            image = document.render_pdf_page(data, index, max_side=max_side, max_pixels=max_pixels, dpi=dpi,
                                             grayscale=grayscale)
            conn.send((True, (image.mode, image.size, image.tobytes())))
        except GnosisError as exc:
            conn.send((False, (exc.code, exc.message)))
        except Exception as exc:  # anything pdfium raises is the page's problem, not the renderer's
            conn.send((False, ("unreadable_document", f"Page {index + 1} of the PDF cannot be rendered: {exc}")))


class _Child:
    def __init__(self, context) -> None:
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs,), name="gnosis-pdf-renderer", daemon=True)
        self.process.start()
        theirs.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class PdfRenderer:
    def __init__(self, processes: int = 2) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._slots = threading.BoundedSemaphore(processes)
        self._idle: list[_Child] = []
        self._lock = threading.Lock()

    def render(self, data: bytes, index: int, *, max_side: int, max_pixels: int, deadline: float,
               dpi: int | None = None, grayscale: bool = False) -> Image.Image:
        """Page `index` of the PDF, or PageTimeout once `deadline` (time.monotonic()) passes, waiting for
        a free renderer included."""
        if not self._slots.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise PageTimeout(f"Page {index + 1} waited past its time limit for a PDF renderer.")
        try:
            child = self._take()
            try:
                child.conn.send((data, index, max_side, max_pixels, dpi, grayscale))
                answered = child.conn.poll(max(deadline - time.monotonic(), 0))
                reply = child.conn.recv() if answered else None
            except (EOFError, OSError) as exc:  # the renderer died on this page (pdfium crashed)
                child.kill()
                raise UnreadableDocument(f"Page {index + 1} of the PDF crashed its renderer.") from exc
            if reply is None:
                log.error("PDF page %d still rendering at its deadline; its renderer is replaced", index + 1)
                child.kill()
                raise PageTimeout(f"Rendering page {index + 1} of the PDF took longer than its time limit.")
            ok, payload = reply
            self._give(child)
        finally:
            self._slots.release()
        if not ok:
            code, message = payload
            raise UnreadableDocument(message, code=code)
        mode, size, raw = payload
        return Image.frombytes(mode, size, raw)

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.process.is_alive():
                    return child
                child.kill()
        return _Child(self._context)

    def _give(self, child: _Child) -> None:
        with self._lock:
            self._idle.append(child)

    def close(self) -> None:
        with self._lock:
            for child in self._idle:
                child.kill()
            self._idle.clear()
