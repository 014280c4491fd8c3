"""The engine interface: one page image in, its text out. Engines are imported by name, lazily."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis
    from PIL import Image

    from ...metrics import Metrics
    from ...settings import Settings


class StopReason(str, enum.Enum):
    """Why a generating engine stopped reading a page."""

    EOS = "eos"  # the model ended the page
    MAX_TOKENS = "max_tokens"  # the token cap (GNOSIS_MAX_NEW_TOKENS) or the context was reached
    REPETITION = "repetition"  # the output looped (repetition.py)

    @property
    def truncated(self) -> bool:
        return self is not StopReason.EOS


@dataclass(frozen=True)
class PageTimings:
    """Where a batched engine's time on a page went, in seconds from the page's submission."""

    queue_seconds: float
    """Until the page was given a slot in the batch."""
    first_token_seconds: float
    """Until its first output token."""


@dataclass(frozen=True)
class PageText:
    text: str
    truncated: bool = False
    stop_reason: StopReason | None = None
    """None for engines that do not generate."""
    tokens: int = 0
    timings: PageTimings | None = None
    """None for engines that read a page in one call."""


class Cancelled(Exception):
    """Raised by a batched engine when the page's job was cancelled or deleted while it waited or decoded."""


class Engine(Protocol):
    model_id: str
    model_revision: str
    batched: bool
    """True when many threads may call `recognize` at once and the engine serves them together."""
    slots: int
    """Pages it serves at once: 1 for an engine that reads one page per call (a process each)."""
    devices: dict[str, int]
    """Slots per device it runs on ({"cpu": 1} for CPU engines); a batched engine's sum to `slots`."""
    render_dpi: int | None
    """PDF pages at this resolution and images unscaled, for an engine that reads pages as scanned;
    None: both fit GNOSIS_PAGE_MAX_SIDE (a VLM's token budget)."""
    render_grayscale: bool
    """PDF pages rendered in gray by pdfium, for an engine that binarises them anyway."""

    def recognize(self, page: Image.Image, *, deadline: float | None = None,
                  cancelled: Callable[[], bool] | None = None, language: str | None = None,
                  deaths: int = 0) -> PageText:
        """The page's text. A batched engine stops at `deadline` (monotonic seconds) with PageTimeout and
        raises Cancelled once `cancelled()` turns true; others leave both to the caller. `language` is
        for engines that need one (Tesseract's codes joined by "+"); the others read any. `deaths`: engine
        deaths the page was on a device for, which a batched engine keeps apart (the others ignore it)."""
        ...


def load_engine(settings: Settings, *, redis_client: redis.Redis, metrics: Metrics,
                on_work: Callable[[str, str, int, float], None] | None = None,
                on_dead: Callable[[BaseException], None] | None = None) -> Engine:
    """The configured engine, loaded. A batched engine reports each prefill chunk and decode step to
    `on_work` (device, "prefill" or "decode", pages, seconds), and calls `on_dead` once if it can no
    longer serve."""
    if settings.engine == "nanonets":
        from ...cache.store import ModelCache
        from .nanonets import NanonetsEngine

        cache = ModelCache(settings, redis_client, metrics)
        path = cache.ensure_ready()
        return NanonetsEngine(path, model_id=settings.model_id, revision=path.name, devices=settings.device,
                              max_new_tokens=settings.max_new_tokens, threads=settings.threads,
                              batch_size=settings.batch_size, max_side=settings.page_max_side,
                              prefill_batch=settings.prefill_batch, prefill_gather=settings.prefill_gather_ms / 1000,
                              prefill_concurrent=settings.prefill_concurrent,
                              repetition_window=settings.repetition_window,
                              vision_attention=settings.vision_attention,
                              decode_attention=settings.decode_attention, on_work=on_work, on_dead=on_dead)
    if settings.engine == "tesseract":
        from .tesseract import TesseractEngine

        return TesseractEngine(threads=settings.threads)
    if settings.engine == "rapidocr":
        from .rapidocr import RapidOcrEngine

        return RapidOcrEngine(threads=settings.threads)
    if settings.engine == "null":
        from .null import NullEngine

        return NullEngine(delay=settings.null_engine_delay)
    raise ValueError(f"unknown engine {settings.engine!r}")
