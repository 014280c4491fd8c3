"""An engine that recognises nothing: it measures the pipeline's own overhead."""

from __future__ import annotations

from collections.abc import Sequence


class NullEngine:
    model_id = "null"
    model_revision = "0"

    def recognize(self, pages: Sequence) -> list[str]:
        return ["" for _ in pages]
