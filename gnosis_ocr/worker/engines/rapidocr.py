"""CPU OCR with the ONNX models bundled in rapidocr-onnxruntime: real text without a GPU or a download."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np

from . import PageText


class RapidOcrEngine:
    model_id = "rapidocr-onnxruntime"
    batched = False
    render_dpi = None
    render_grayscale = False
    slots = 1
    devices = {"cpu": 1}

    def __init__(self, threads: int = 0) -> None:
        from rapidocr_onnxruntime import RapidOCR

        options = {}
        if threads > 0:
            # onnxruntime and OpenCV otherwise take every core in every pool process.
            import cv2

            cv2.setNumThreads(threads)
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        self._ocr = RapidOCR(**options)
        self.model_revision = version("rapidocr-onnxruntime")

    def recognize(self, page, **_) -> PageText:
        result, _ = self._ocr(np.asarray(page.convert("RGB")))
        return PageText("\n".join(_reading_order(result)) if result else "")


def _reading_order(result: list) -> list[str]:
    """Group detected boxes into lines (by vertical overlap), then read each line left to right."""
    boxes = []
    for box, text, _score in result:
        ys = [p[1] for p in box]
        xs = [p[0] for p in box]
        boxes.append((min(ys), max(ys), min(xs), text))
    boxes.sort()
    lines: list[list[tuple]] = []
    for top, bottom, left, text in boxes:
        if lines:
            line = lines[-1]
            line_top = min(b[0] for b in line)
            line_bottom = max(b[1] for b in line)
            overlap = min(bottom, line_bottom) - max(top, line_top)
            if overlap > 0.5 * min(bottom - top, line_bottom - line_top):
                line.append((top, bottom, left, text))
                continue
        lines.append([(top, bottom, left, text)])
    return [" ".join(b[3] for b in sorted(line, key=lambda b: b[2])) for line in lines]
