"""Operations routes: liveness, readiness, Prometheus metrics, the OpenAPI description."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, jsonify

from .. import redismemory
from ..broker import CACHE_QUEUE_SUFFIX
from ..job import owner_backlogs
from ..metrics import RedisCollector
from . import ctx, queue_length
from .auth import require_key
from .errors import error_response

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    try:
        # Fresh round trips: readiness is about Redis answering now.
        memory = redismemory.read(ctx().redis, persistence=True)
        acceptance = ctx().acceptance
        replicated = acceptance.describe() if acceptance.enabled else None
    except redis.RedisError as exc:
        return error_response(503, "redis_unavailable", f"Redis does not answer: {exc}",
                              retry_after=ctx().settings.retry_after)
    # An evicting Redis, or one short of the replicas acceptance needs, still serves polls and results,
    # so the API stays ready; the body says what is wrong, loudly.
    body = {"status": "ready", "redis": memory.describe()}
    if replicated is not None:
        body["redis"]["replication"] = replicated
    return jsonify(body)


@bp.get("/metrics")
def metrics():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    c = ctx()
    if not c.settings.metrics_open:
        require_key()

    def queue_gauges():  # what an autoscaler reads (deploy/gke/base/keda.yaml): scale out on waiting pages
        depth = GaugeMetricFamily("gnosis_queue_depth", "Messages waiting in a queue: pages on the page queue, "
                                  "downloads and batch listings on its .cache queue.", labels=["queue"])
        for queue in (c.settings.queue, c.settings.queue + CACHE_QUEUE_SUFFIX):
            depth.add_metric([queue], queue_length(c.redis, queue))
        yield depth
        inflight = GaugeMetricFamily("gnosis_pages_in_flight", "Pages taken by a worker and not yet acknowledged.")
        inflight.add_metric([], c.redis.hlen("unacked"))
        yield inflight
        backlog = GaugeMetricFamily("gnosis_key_pages_pending", "Pages of live jobs not yet done, per API key id "
                                    "(the empty id: no keys configured).", labels=["key"])
        for owner, pages in owner_backlogs(c.redis).items():
            backlog.add_metric([owner], pages)
        yield backlog

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(c.redis, extra=[queue_gauges]))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4; charset=utf-8")


@bp.get("/openapi.json")
def openapi():
    from .openapi import spec

    return jsonify(spec())
