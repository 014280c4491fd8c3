"""An engine that recognises nothing: it measures the pipeline's own overhead."""

from __future__ import annotations

import time

from . import PageText


class NullEngine:
    model_id = "null"
    model_revision = "0"
    batched = False
    render_dpi = None
    render_grayscale = False
    slots = 1
    devices = {"cpu": 1}

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def recognize(self, page, **_) -> PageText:
        if self.delay:
            time.sleep(self.delay)  # stands in for GPU time in load tests and fault drills
        return PageText("")
