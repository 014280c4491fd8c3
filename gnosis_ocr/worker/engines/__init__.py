"""The engine interface: a list of page images in, their texts out. Engines are imported by name, lazily."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis
    from PIL import Image

    from ...metrics import Metrics
    from ...settings import Settings


class Engine(Protocol):
    model_id: str
    model_revision: str

    def recognize(self, pages: Sequence[Image.Image]) -> list[str]:
        """One text per page, in order. Taking a list lets GPU engines batch later without touching callers."""
        ...


def load_engine(settings: Settings, *, redis_client: redis.Redis, metrics: Metrics) -> Engine:
    if settings.engine == "nanonets":
        from ...cache.store import ModelCache
        from .nanonets import NanonetsEngine

        cache = ModelCache(settings, redis_client, metrics)
        path = cache.ensure_ready()
        return NanonetsEngine(path, model_id=settings.model_id, revision=path.name, device=settings.device,
                              max_new_tokens=settings.max_new_tokens, threads=settings.engine_threads)
    if settings.engine == "rapidocr":
        from .rapidocr import RapidOcrEngine

        return RapidOcrEngine(threads=settings.engine_threads)
    if settings.engine == "null":
        from .null import NullEngine

        return NullEngine(delay=settings.null_engine_delay)
    raise ValueError(f"unknown engine {settings.engine!r}")
