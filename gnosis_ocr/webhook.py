"""Webhooks: a signed POST of the final job object to the submitter's `callback_url`.

Signature: `X-Gnosis-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with
GNOSIS_WEBHOOK_SECRET>`. Receivers recompute it and reject stale timestamps (replays).
Addresses are checked when the URL is accepted and again before each delivery (DNS can change), and
the delivery connects to the address it checked: loopback, private, link-local, multicast and
reserved addresses (also inside IPv6 forms that carry an IPv4 address) are refused unless
GNOSIS_WEBHOOK_ALLOW_PRIVATE is set. `X-Gnosis-Delivery` is one id per event, the same on retries.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

from .errors import BadRequest

MAX_URL = 2048


class DeliveryFailed(Exception):
    """A delivery that may succeed if retried (network error, no answer in time, 5xx, 408, 429)."""


class DeliveryRejected(Exception):
    """A delivery that no retry will fix (the receiver answered with a redirect)."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300) -> bool:
    """For receivers (and tests): check a signature header and its freshness."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translators, never public
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 (SIIT): ::ffff:0:a.b.c.d


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, NAT64, Teredo):
    a packet to it may reach them, so they are what is judged."""
    if address.ipv4_mapped:
        return [address.ipv4_mapped]
    if address.sixtofour:
        return [address.sixtofour]
    if address.teredo:
        return list(address.teredo)
    if address in _NAT64 or address in _IPV4_TRANSLATED or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not address.is_global or address.is_multicast:
        return False
    if address.version == 6:
        if address in _LOCAL_NAT64:
            return False
        return all(is_public(inner) for inner in _embedded_ipv4(address))
    return True


def check_url(url: str, *, allow_private: bool) -> str:
    """The URL if it is an http(s) URL whose host resolves only to public addresses; BadRequest otherwise."""
    resolve(url, allow_private=allow_private)
    return url


def resolve(url: str, *, allow_private: bool) -> list[str]:
    """The addresses the URL's host resolves to, every one of them checked; BadRequest otherwise."""
    if len(url) > MAX_URL:
        raise BadRequest(f"callback_url is longer than {MAX_URL} characters.", code="invalid_callback_url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("callback_url must be an http:// or https:// URL.", code="invalid_callback_url")
    if "@" in parts.netloc:  # credentials, even empty ones ("http://:@host/")
        raise BadRequest("callback_url must not carry credentials.", code="invalid_callback_url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise BadRequest(f"callback_url host {parts.hostname!r} does not resolve.",
                         code="invalid_callback_url") from None
    addresses = list(dict.fromkeys(info[4][0].split("%", 1)[0] for info in infos))
    if not allow_private and not all(is_public(ipaddress.ip_address(a)) for a in addresses):
        raise BadRequest("callback_url points to a loopback, private or reserved address.",
                         code="invalid_callback_url")
    return addresses


def delivery_id(job_id: str, status: str) -> str:
    """One id per event, the same on every retry, so receivers can drop repeats."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"gnosis-ocr:{job_id}:{status}").hex


def deliver(url: str, payload: dict, *, secret: str, allow_private: bool, timeout: float, kind: str = "job") -> int:
    """POST once, all of it (connect, TLS, request, the answer's status line and headers) within
    `timeout` seconds. Returns the status; raises DeliveryFailed when a retry may help and
    DeliveryRejected when it cannot (a redirect: it could lead anywhere, past the address check)."""
    import http.client
    import ssl

    # Connect to the address that was checked: resolving the name again could reach anywhere (DNS rebinding).
    address = resolve(url, allow_private=allow_private)[0]
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",  # the answer is never decompressed: nothing of it is read but its head
        "User-Agent": "gnosis-ocr-webhook/1",
        "X-Gnosis-Event": f"{kind}.{payload['status']}",
        "X-Gnosis-Delivery": delivery_id(payload["id"], payload["status"]),
        "X-Gnosis-Signature": sign(secret, int(time.time()), body),
    }
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    held: list[socket.socket] = []
    # Per-read timeouts alone let a receiver that answers a byte a second hold a delivery (and a light
    # worker's thread) for ever: at the deadline the socket is shut, whatever the delivery is waiting on.
    watchdog = threading.Timer(timeout, lambda: [_shut(sock) for sock in held])
    watchdog.daemon = True
    watchdog.start()
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
        held.append(sock)
        if parts.scheme == "https":
            # The certificate is checked against the URL's host name, not the address dialled.
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            held.append(sock)
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        conn.sock = sock
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        status = response.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        late = not watchdog.is_alive()
        raise DeliveryFailed(f"no answer within {timeout:.0f}s" if late else f"{type(exc).__name__}: {exc}") from None
    finally:
        watchdog.cancel()
        for sock in held:
            sock.close()
    if 300 <= status < 400:
        raise DeliveryRejected(f"HTTP {status}: redirects are not followed")
    if status >= 500 or status in (408, 429):
        raise DeliveryFailed(f"HTTP {status}")
    return status


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
