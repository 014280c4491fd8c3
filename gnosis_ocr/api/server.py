"""The API under gunicorn with gevent workers (`gworker.py`): idle and slow clients cost a greenlet each."""

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
            # gevent: connections per process, each a greenlet. gthread (behind a buffering proxy
            # only): `threads` requests at once per process, a slow client holding one.
            **({"worker_class": "gnosis_ocr.api.gworker.ApiWorker", "worker_connections": settings.api_connections}
               if settings.api_worker_class == "gevent" else {"worker_class": "gthread", "threads": threads}),
            # The worker's heartbeat to the master: a process whose event loop is blocked this long is replaced.
            "timeout": 120,
            "graceful_timeout": 30,
            # Also the limit on reading a request head: a client that trickles its headers is dropped.
            "keepalive": settings.header_timeout,
            "limit_request_line": 4094,
            "limit_request_fields": 64,
            "limit_request_field_size": 8190,
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
