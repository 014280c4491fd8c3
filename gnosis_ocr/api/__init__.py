"""The HTTP API: a thin Flask app that checks documents, records jobs and enqueues pages.

It never imports torch, transformers or an OCR engine; the tests assert it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Flask, current_app

from ..broker import make_producer
from ..job import JobStore
from ..metrics import Metrics
from ..settings import Settings

__all__ = ["create_app", "ctx"]


@dataclass
class ApiContext:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    producer: object
    metrics: Metrics


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    # Uploads must spool to disk, never sit whole in a form field in memory.
    app.config["MAX_FORM_MEMORY_SIZE"] = 64 * 1024
    app.json.sort_keys = False
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
    )
    app.extensions["gnosis"] = ApiContext(
        settings=settings,
        redis=client,
        jobs=JobStore(client, ttl=settings.job_ttl, max_attempts=settings.page_max_attempts),
        producer=make_producer(settings),
        metrics=Metrics(client, background=True),
    )

    from . import cache, errors, jobs, ops, ui

    errors.register(app)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(cache.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(ui.bp)
    return app


def ctx() -> ApiContext:
    return current_app.extensions["gnosis"]
