"""An engine that recognises nothing: it measures the pipeline's own overhead."""

from __future__ import annotations

import time
from collections.abc import Sequence


class NullEngine:
    model_id = "null"
    model_revision = "0"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def recognize(self, pages: Sequence) -> list[str]:
        if self.delay:
            time.sleep(self.delay * len(pages))  # stands in for GPU time in load tests and fault drills
        return ["" for _ in pages]
