"""A webhook endpoint on loopback for the tests and the soak: records every POST and answers it, refusing
some (503) so that the sender's retries are exercised."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Records every POST as (headers, body) in `calls`; answers 204, or 503 to the first `fail_first` and to
    every `refuse_every`-th (0: none)."""

    def __init__(self, fail_first: int = 0, refuse_every: int = 0) -> None:
        self.fail_first, self.refuse_every = fail_first, refuse_every
        self.calls: list[tuple[dict, bytes]] = []
        self.refused: set[int] = set()  # indexes in `calls` answered 503
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    receiver.calls.append((dict(self.headers), body))
                    n = len(receiver.calls)
                    refuse = n <= receiver.fail_first or bool(receiver.refuse_every and n % receiver.refuse_every == 0)
                    if refuse:
                        receiver.refused.add(n - 1)
                self.send_response(503 if refuse else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def accepted(self) -> list[tuple[dict, bytes]]:
        """The POSTs answered 204, in order."""
        return [call for i, call in enumerate(list(self.calls)) if i not in self.refused]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
