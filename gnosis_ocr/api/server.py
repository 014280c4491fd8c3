"""The API under gunicorn with gevent workers (`gworker.py`): idle and slow clients cost a greenlet each."""

from __future__ import annotations

import errno
import os
import socket

from gunicorn.app.base import BaseApplication

from ..errors import ConfigError
from ..settings import Settings
from . import create_app

_SINCE_25 = frozenset({"control_socket_disable"})
"""Options older gunicorn releases (the floor is 22) do not know, and do without."""


class ApiServer(BaseApplication):
    def __init__(self, settings: Settings, *, host: str, port: int, workers: int, threads: int) -> None:
        self.settings = settings
        check_listen(host, port)
        self.options = {
            "bind": _address(host, port),
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
            # gunicorn 25.1+ opens a control socket under $HOME: an error line on a read-only root
            # filesystem, and one path shared by every API on a host. Nothing here uses it.
            "control_socket_disable": True,
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if value is None or (key in _SINCE_25 and key not in self.cfg.settings):
                continue
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings)


def check_listen(host: str, port: int) -> None:
    """ConfigError, in one line, when the API could not listen on host:port (an address this machine
    does not have, a port another process holds), instead of gunicorn retrying for seconds and leaving
    with its own log lines and exit 1. Bound the way gunicorn binds (SO_REUSEADDR), then closed."""
    where = _address(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"GNOSIS_HOST / --host {host!r} is not an address to listen on: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {where}: another process holds the port "
                                  "(PORT / --port)") from None
            raise ConfigError(f"cannot listen on {where}: {exc.strerror}") from None


def _address(host: str, port: int) -> str:
    """host:port as gunicorn's bind reads it: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _access_log() -> str | None:
    """`-` (stdout) by default; a path; or `off`."""
    value = os.environ.get("GNOSIS_ACCESS_LOG", "-")
    return None if value.lower() in ("", "off", "none") else value
