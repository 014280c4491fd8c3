"""An HTTP proxy in front of the GCS emulator that answers the requests a test names with 503, as a
bucket does while overloaded or out of reach (the storage client retries, then gives up with the
error our code has to handle), or with 403, as to an account without the permission. Every other
request goes through unchanged, after an optional latency (the emulator answers in a millisecond, a
real bucket in tens)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Rule = Callable[[str, str], bool]
"""(method, path with query) -> whether to refuse the request."""

EVERYTHING: Rule = lambda method, path: True  # noqa: E731
WRITES: Rule = lambda method, path: path.startswith("/upload/")  # noqa: E731


class FlakyBucket:
    def __init__(self, upstream: str, *, latency: float = 0.0) -> None:
        """`upstream`: the emulator's http://host:port; `self.url` goes through the proxy, each request
        `latency` seconds later than it would (a real bucket's tens of milliseconds per request)."""
        target = urlsplit(upstream)
        self._upstream = (target.hostname, target.port)
        self._rule: Rule | None = None
        self._status = 503
        self._latency = latency
        self._lock = threading.Lock()
        self.refused: list[tuple[str, str]] = []
        """(method, path) of every request refused, in order."""
        self.seen: list[tuple[str, str]] = []
        """(method, path) of every request, in order."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy._refuses(self.command, self.path)
                if status:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    message = json.dumps({"error": {"code": status, "message": HTTPStatus(status).phrase}}).encode()
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                if proxy._latency:
                    time.sleep(proxy._latency)  # the bucket's round trip, not a synchronisation
                upstream = http.client.HTTPConnection(*proxy._upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="flaky-bucket", daemon=True).start()

    def refuse(self, rule: Rule | None, *, status: int = 503) -> None:
        """Answer `status` to what `rule` picks from now on (503: failing for now; 403: refused for
        good, as to a service account without the permission); None: let everything through again."""
        with self._lock:
            self._rule, self._status = rule, status

    def _refuses(self, method: str, path: str) -> int:
        """The status to answer the request with instead of forwarding it; 0 to forward it."""
        with self._lock:
            self.seen.append((method, path))
            if self._rule is None or not self._rule(method, path):
                return 0
            self.refused.append((method, path))
            return self._status

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
