"""The worker's own HTTP port: /healthz, /readyz (model loaded?) and /metrics for orchestrators.

Pool children record into prometheus-client's multiprocess directory; the
worker's main process serves the sum, so a scrape sees every child, dead or alive.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis

from .. import keys, redismemory

log = logging.getLogger(__name__)

class Probe:
    def __init__(self, client: redis.Redis, *, port: int, worker: str, concurrency: int,
                 dead: Callable[[], BaseException | None] = lambda: None) -> None:
        self.redis = client
        self.dead = dead
        self.worker = worker
        self.concurrency = max(concurrency, 1)
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                probe.handle(self)

        self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self.server.daemon_threads = True

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="gnosis-probe", daemon=True).start()
        log.info("worker probe on port %d", self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path == "/healthz":
            return self._send(h, 200, {"status": "ok"})
        if path == "/readyz":
            dead = self.dead()
            if dead is not None:  # known here first: the record in Redis may lag a beat
                return self._send(h, 503, {"status": "engine_dead", "detail": str(dead)})
            try:
                record = self.redis.get(keys.worker(self.worker))
                loaded = json.loads(record)["engines_loaded"] if record else 0
                memory = redismemory.read(self.redis, persistence=True)
            except redis.RedisError as exc:
                return self._send(h, 503, {"status": "redis_unavailable", "detail": str(exc)})
            body = {"engines_loaded": loaded, "concurrency": self.concurrency, "redis": memory.describe()}
            return self._send(h, 200 if loaded >= self.concurrency else 503,
                              {"status": "ready" if loaded >= self.concurrency else "loading", **body})
        if path == "/metrics":
            return self._metrics(h)
        self._send(h, 404, {"error": {"code": "not_found", "message": "No such route."}})

    def _metrics(self, h: BaseHTTPRequestHandler) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(registry)
        data = generate_latest(registry)
        h.send_response(200)
        h.send_header("Content-Type", CONTENT_TYPE_LATEST)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
