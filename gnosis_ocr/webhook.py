"""Webhooks: a signed POST of the final job object to the submitter's `callback_url`.

Signature: `X-Gnosis-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with
GNOSIS_WEBHOOK_SECRET>`. Receivers recompute it and reject stale timestamps (replays).
Addresses are checked when the URL is accepted and again before each delivery (DNS can change):
loopback, private, link-local, multicast and reserved addresses are refused unless
GNOSIS_WEBHOOK_ALLOW_PRIVATE is set.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
import uuid
from urllib.parse import urlsplit

from .errors import BadRequest

MAX_URL = 2048


class DeliveryFailed(Exception):
    """A delivery that may succeed if retried (network error, 5xx, 408, 429)."""


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


def check_url(url: str, *, allow_private: bool) -> str:
    """The URL if it is an http(s) URL whose host resolves only to public addresses; BadRequest otherwise."""
    if len(url) > MAX_URL:
        raise BadRequest(f"callback_url is longer than {MAX_URL} characters.", code="invalid_callback_url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("callback_url must be an http:// or https:// URL.", code="invalid_callback_url")
    if parts.username or parts.password:
        raise BadRequest("callback_url must not carry credentials.", code="invalid_callback_url")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise BadRequest(f"callback_url host {parts.hostname!r} does not resolve.",
                         code="invalid_callback_url") from None
    if not allow_private:
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if not address.is_global or address.is_multicast:
                raise BadRequest("callback_url points to a loopback, private or reserved address.",
                                 code="invalid_callback_url")
    return url


def deliver(url: str, payload: dict, *, secret: str, allow_private: bool, timeout: float) -> int:
    """POST once. Returns the status; raises DeliveryFailed when a retry may help."""
    import requests

    check_url(url, allow_private=allow_private)
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "gnosis-ocr-webhook/1",
        "X-Gnosis-Event": f"job.{payload['status']}",
        "X-Gnosis-Delivery": uuid.uuid4().hex,
        "X-Gnosis-Signature": sign(secret, int(time.time()), body),
    }
    try:
        # No redirects: a redirect could lead anywhere, past the address check.
        response = requests.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise DeliveryFailed(str(exc)) from None
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise DeliveryFailed(f"HTTP {response.status_code}")
    return response.status_code
