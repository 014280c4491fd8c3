"""TCP proxies in front of Redis.

ReplyLosingProxy loses the reply to one script call: the command reaches Redis and runs, then the
connection drops before its answer gets back (a network blip, a failover's reset, a load balancer's
idle cut). The client sees a connection error and retries the very same call.

HoldingProxy carries a replica's link to its primary and can hold back what the primary sends: the
replica falls behind (a slow link, a busy replica) while the primary goes on taking writes.

SilencingProxy turns chosen connections silent without closing them, as a path that died without a
reset leaves them.

MovingProxy is one address that follows the primary, as a managed Redis's endpoint or a Kubernetes
Service does: moved, it resets every connection and sends the next ones to the new node."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit


class _Proxy:
    def __init__(self, upstream_url: str) -> None:
        """`upstream_url`: a redis:// URL on loopback; `self.url` is the same database through the proxy."""
        parts = urlsplit(upstream_url)
        self.upstream_port = parts.port or 6379
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = urlunsplit((parts.scheme, f"127.0.0.1:{self.port}", parts.path, "", ""))

    def stop(self) -> None:
        self.server.close()


class ReplyLosingProxy(_Proxy):
    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self._target: bytes | None = None
        self._on_lost: Callable[[], None] | None = None
        self.lost = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, script: str, *, then: Callable[[], None] | None = None) -> None:
        """The next call of `script` (by its SHA, as redis-py's EVALSHA sends it) runs, and its reply is
        dropped with the connection; `then` runs at that moment, before anything else gets through."""
        self._target = hashlib.sha1(script.encode()).hexdigest().encode()
        self._on_lost = then

    def _accept(self) -> None:
        for client, upstream in _pairs(self.server, self.upstream_port):
            armed = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, armed), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, armed), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, armed: threading.Event) -> None:
        while data := _recv(client):
            with self._lock:
                if self._target is not None and b"EVALSHA" in data.upper() and self._target in data:
                    armed.set()
            if not _send(upstream, data):
                break
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, armed: threading.Event) -> None:
        while data := _recv(upstream):
            if armed.is_set():
                armed.clear()
                if not data.startswith(b"-NOSCRIPT"):  # the script ran: this reply is the one to lose
                    with self._lock:
                        self._target = None
                        then, self._on_lost = self._on_lost, None
                    if then is not None:
                        then()
                    self.lost.set()
                    break
            if not _send(client, data):
                break
        _close(client, upstream)


class HoldingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._socks: list[socket.socket] = []
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        """From now on nothing the primary sends reaches the replica (its acknowledgements still go up)."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close the link and the port for good: what was held back is never delivered."""
        self._cut = True
        self.server.close()
        _close(*self._socks)
        self._flowing.set()  # wakes a held pump, which drops what it holds

    def _accept(self) -> None:
        for client, upstream in _pairs(self.server, self.upstream_port):
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self._flowing), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, gate: threading.Event | None) -> None:
        while data := _recv(source):
            if gate is not None:
                gate.wait()  # held: what arrived waits here for release, and is dropped by cut
                if self._cut:
                    break
            if not _send(sink, data):
                break
        _close(source, sink)


class MovingProxy(_Proxy):
    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        super().stop()
        self._reset()

    def move_to(self, port: int) -> None:
        """Every connection open now is reset; the next ones reach the node on `port`."""
        self.upstream_port = port
        self._reset()

    def _reset(self) -> None:
        socks, self._socks = self._socks, []
        _close(*socks)

    def _accept(self) -> None:
        for client, upstream in _pairs(self.server, lambda: self.upstream_port):
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        while (data := _recv(source)) and _send(sink, data):
            pass
        _close(source, sink)


class SilencingProxy(_Proxy):
    """Carries every connection to Redis until `silence()`: from then on each connection open at that moment
    goes silent both ways once it sends a command containing `marker`: open, carrying nothing, as a TCP
    connection does whose path died without a reset (a firewall's or NAT's state dropped, a host gone
    without a word). Connections made afterwards go through, as a reconnect would."""

    def __init__(self, upstream_url: str, marker: bytes) -> None:
        super().__init__(upstream_url)
        self.marker = marker
        self._open: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def carrying(self) -> int:
        """Connections open that have sent `marker`."""
        with self._lock:
            return sum(1 for link in self._open if link["sent"] and not link["closed"])

    def silenced(self) -> int:
        with self._lock:
            return sum(1 for link in self._open if link["silent"])

    def silence(self) -> None:
        with self._lock:
            for link in self._open:
                link["doomed"] = True

    def _accept(self) -> None:
        for client, upstream in _pairs(self.server, self.upstream_port):
            link = {"sent": False, "doomed": False, "silent": False, "closed": False}
            with self._lock:
                self._open.append(link)
            threading.Thread(target=self._pump, args=(client, upstream, link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, link, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, link: dict, up: bool) -> None:
        while data := _recv(source):
            with self._lock:
                if up and self.marker in data.upper():
                    link["sent"] = True
                    link["silent"] = link["silent"] or link["doomed"]
                silent = link["silent"]
            if silent:
                continue  # read and dropped: the peer never hears of it, and nothing is closed
            if not _send(sink, data):
                break
        with self._lock:
            link["closed"] = True
        _close(source, sink)


def _pairs(server: socket.socket, upstream_port: int | Callable[[], int]):
    """Each connection accepted, with one of its own to Redis (on the port `upstream_port` is or returns
    now), until the server is closed. One that Redis refuses (it is down) is closed at once: the client
    finds its link down and tries again."""
    while True:
        try:
            client, _ = server.accept()
        except OSError:
            return
        try:
            port = upstream_port() if callable(upstream_port) else upstream_port
            upstream = socket.create_connection(("127.0.0.1", port))
        except OSError:
            _close(client)
            continue
        yield client, upstream


def _send(sock: socket.socket, data: bytes) -> bool:
    """Whether `data` went out: False once the other side is gone."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
