"""Optional API keys: set GNOSIS_API_KEYS, and each job belongs to the key that created it."""

from __future__ import annotations

import hmac

from flask import g, request

from ..errors import Unauthorized
from ..settings import hash_key
from . import ctx


def require_key() -> None:
    """before_request hook for the job and cache routes; a no-op while no keys are configured."""
    hashes = ctx().settings.api_key_hashes
    if not hashes:
        g.owner = ""
        return
    presented = _presented_key()
    if presented is None:
        raise Unauthorized("An API key is required: send it as 'Authorization: Bearer <key>'.")
    digest = hash_key(presented)
    # Compare against every key, without stopping early, so timing reveals nothing.
    matched = False
    for known in hashes:
        matched |= hmac.compare_digest(digest, known)
    if not matched:
        raise Unauthorized("The API key is not valid.")
    g.owner = digest[:16]


def current_owner() -> str:
    return g.get("owner", "")


def _presented_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key") or None
