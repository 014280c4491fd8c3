"""The API under gunicorn (threads per process, so long-polls do not starve submissions)."""

from __future__ import annotations

import os

from gunicorn.app.base import BaseApplication

from ..settings import Settings
from . import create_app


class ApiServer(BaseApplication):
    def __init__(self, settings: Settings, *, host: str, port: int, workers: int, threads: int) -> None:
        self.settings = settings
        self.options = {
            "bind": f"{host}:{port}",
            "workers": workers,
            "worker_class": "gthread",
            "threads": threads,
            # Longer than the longest long-poll (?wait=30) plus an upload.
            "timeout": 120,
            "graceful_timeout": 30,
            "keepalive": 5,
            "accesslog": _access_log(),
            "errorlog": "-",
            "loglevel": os.environ.get("GNOSIS_LOG_LEVEL", "info").lower(),
            "proc_name": "gnosis-ocr-api",
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings)


def _access_log() -> str | None:
    """`-` (stdout) by default; a path; or `off`."""
    value = os.environ.get("GNOSIS_ACCESS_LOG", "-")
    return None if value.lower() in ("", "off", "none") else value
