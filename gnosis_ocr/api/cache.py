"""/v1/cache: the shared model cache's state, and the warm-up trigger."""

from __future__ import annotations

from flask import Blueprint, jsonify

from . import ctx
from .auth import require_key

bp = Blueprint("cache", __name__, url_prefix="/v1/cache")
bp.before_request(require_key)


@bp.get("")
def status():
    from ..cache.state import CacheState

    return jsonify(CacheState(ctx().redis, ctx().settings).describe())


@bp.post("/warm")
def warm():
    from ..broker import WARM_CACHE_TASK, cache_queue
    from ..cache.state import CacheState

    c = ctx()
    state = CacheState(c.redis, c.settings)
    info = state.describe()
    if info["state"] == "ready":
        return jsonify(info), 200
    if state.request_warm():
        c.producer.send_task(WARM_CACHE_TASK, queue=cache_queue(c.settings))
    info = state.describe()
    info["warm_requested"] = True
    return jsonify(info), 202
