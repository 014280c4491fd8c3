"""The engine interface: one page image in, its text out. Engines are imported by name, lazily."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis
    from PIL import Image

    from ...metrics import Metrics
    from ...settings import Settings


@dataclass(frozen=True)
class PageText:
    text: str
    truncated: bool = False
    stop_reason: str | None = None
    """Why generation ended: "eos", "max_tokens" or "repetition"; None for engines that do not generate."""
    tokens: int = 0
    queue_seconds: float | None = None
    first_token_seconds: float | None = None


class Cancelled(Exception):
    """Raised by a batched engine when the page's job was cancelled or deleted while it waited or decoded."""


class Engine(Protocol):
    model_id: str
    model_revision: str
    batched: bool
    """True when many threads may call `recognize` at once and the engine serves them together."""
    render_dpi: int | None
    """PDF pages at this resolution and images unscaled, for an engine that reads pages as scanned;
    None: both fit GNOSIS_PAGE_MAX_SIDE (a VLM's token budget)."""
    render_grayscale: bool
    """PDF pages rendered in gray by pdfium, for an engine that binarises them anyway."""

    def recognize(self, page: Image.Image, *, deadline: float | None = None,
                  cancelled: Callable[[], bool] | None = None, language: str | None = None) -> PageText:
        """The page's text. A batched engine stops at `deadline` (monotonic seconds) with PageTimeout and
        raises Cancelled once `cancelled()` turns true; others leave both to the caller. `language` is
        for engines that need one (Tesseract's codes joined by "+"); the others read any."""
        ...


def load_engine(settings: Settings, *, redis_client: redis.Redis, metrics: Metrics,
                on_step: Callable[[str, int], None] | None = None,
                on_dead: Callable[[BaseException], None] | None = None) -> Engine:
    """The configured engine, loaded. `on_dead` is called once if a batched engine can no longer serve."""
    if settings.engine == "nanonets":
        from ...cache.store import ModelCache
        from .nanonets import NanonetsEngine

        cache = ModelCache(settings, redis_client, metrics)
        path = cache.ensure_ready()
        return NanonetsEngine(path, model_id=settings.model_id, revision=path.name, devices=settings.devices,
                              max_new_tokens=settings.max_new_tokens, threads=settings.engine_threads,
                              batch_size=settings.batch_size, max_side=settings.page_max_side,
                              prefill_batch=settings.prefill_batch, repetition_window=settings.repetition_window,
                              vision_attention=settings.vision_attention, on_step=on_step, on_dead=on_dead)
    if settings.engine == "tesseract":
        from .tesseract import TesseractEngine

        return TesseractEngine(threads=settings.engine_threads)
    if settings.engine == "rapidocr":
        from .rapidocr import RapidOcrEngine

        return RapidOcrEngine(threads=settings.engine_threads)
    if settings.engine == "null":
        from .null import NullEngine

        return NullEngine(delay=settings.null_engine_delay)
    raise ValueError(f"unknown engine {settings.engine!r}")
