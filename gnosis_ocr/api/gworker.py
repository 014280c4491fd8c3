"""The API's gunicorn worker: gevent, so a slow socket or a long-poll costs a greenlet, not a thread.

With threads, 32 sockets that send their headers slowly, or 32 long-polls, held every thread and
`/healthz` stopped answering. Here each connection is a greenlet: a client must send a complete
request head within GNOSIS_HEADER_TIMEOUT seconds (gunicorn's keep-alive timeout around the parse) or
be dropped, and a long-poll waits on Redis without holding anything but its socket.

Errors gunicorn answers itself, before Flask sees the request (an oversized request line or header,
a malformed request), leave in the API's JSON shape too.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
          431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    body = json.dumps({"error": {"code": _CODES.get(status_int, "bad_request"), "message": f"{reason}: {mesg}"}})
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, (head + body).encode("latin1", "replace"))
    _linger(sock)


def _linger(sock, *, seconds: float = 1.0, limit: int = 1 << 20) -> None:
    """Read what the client still sends before the socket is closed: closing with unread bytes makes
    the kernel send a reset, and the client can lose the answer it was just sent."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        drained = 0
        while drained < limit and (chunk := sock.recv(65536)):
            drained += len(chunk)
    except OSError:
        pass


class ApiWorker(GeventWorker):
    def init_process(self) -> None:
        util.write_error = write_json_error  # gunicorn's own error pages, in this process only
        super().init_process()
