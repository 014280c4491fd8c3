"""/v1/batches: bucket to bucket. The API checks and records a batch and hands its listing to a light
worker; no document passes through it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid

import redis
from flask import Blueprint, jsonify, request

from .. import gcs, keys, options, webhook
from ..batch import BatchStore
from ..broker import EXPAND_BATCH_TASK, cache_queue
from ..errors import BadRequest, NotFound
from ..job import ClaimLost
from . import ctx, idempotency
from .auth import current_owner, require_key

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
bp.before_request(require_key)

_BATCH_ID = re.compile(r"^[0-9a-f]{32}$")
PAGE_LIMIT = 100
"""Failed documents returned per page of /documents."""


def store() -> BatchStore:
    return BatchStore(ctx().redis, ttl=ctx().settings.job_ttl)


@bp.post("")
def create():
    c = ctx()
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        idempotency.validate(key)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("Send the batch as a JSON object.", code="invalid_parameter")
    source = gcs.parse(body.get("source"), field="source")
    destination = gcs.parse(body.get("destination"), field="destination")
    gcs.check_allowed(source, c.settings.batch_buckets, field="source")
    gcs.check_allowed(destination, c.settings.batch_buckets, field="destination")
    if source.bucket == destination.bucket and (source.prefix.startswith(destination.prefix)
                                                 or destination.prefix.startswith(source.prefix)):
        raise BadRequest("source and destination must not contain one another: results would be read back "
                         "as documents.", code="invalid_parameter")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise BadRequest("overwrite must be true or false.", code="invalid_parameter")
    pages, language = body.get("pages"), body.get("language")
    for name, value in (("pages", pages), ("language", language)):
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{name} must be a string.", code="invalid_parameter")
    if pages is not None:
        options.parse_pages(pages)  # checked against each document when its job is made
    if language is not None:
        options.check_language(language, c.languages.get())
    callback_url = body.get("callback_url") or ""
    if callback_url:
        if not isinstance(callback_url, str):
            raise BadRequest("callback_url must be a string.", code="invalid_callback_url")
        if not c.settings.webhook_secret:
            raise BadRequest("Webhooks are not enabled on this server (GNOSIS_WEBHOOK_SECRET is unset).",
                             code="webhooks_disabled")
        callback_url = webhook.check_url(callback_url, allow_private=c.settings.webhook_allow_private)
    batch_id = uuid.uuid4().hex
    idem_name = claim = ""
    if key is not None:
        # The same request again (a client retrying a lost answer) gets the same batch, never a second
        # listing of the same documents.
        idem_name = keys.batch_idempotency(current_owner(), key)
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        claim = idempotency.claim_value(batch_id, fingerprint)
        answer = idempotency.take_key(c.redis, idem_name, new_id=batch_id, fingerprint=fingerprint,
                                      ttl=c.settings.job_ttl, replay=_replay)
        if answer is not None:
            return answer
    try:
        batch = store().create(source=source.uri, destination=destination.uri, owner=current_owner(),
                               overwrite=overwrite, callback_url=callback_url,
                               options=options.Options(pages=pages, language=language).to_record(),
                               batch_id=batch_id, idem_name=idem_name, idem_claim=claim)
    except ClaimLost:  # a retry took the key over and made the batch while this request was slow
        return _replay(idempotency.holder(c.redis, idem_name) or batch_id) or idempotency.still_in_use()
    except Exception:
        if idem_name:
            idempotency.release(c.redis, idem_name, claim)  # nothing was written: the key is free again
        raise
    try:
        c.producer.send_task(EXPAND_BATCH_TASK, args=[batch.id], queue=cache_queue(c.settings))
        c.confirm_accepted("batch")
    except Exception:
        # An accepted batch must be a listed one that outlives a failover: if its listing cannot be sent,
        # or replicas do not confirm it, it never existed (and the client, told 503, may send it again),
        # unless a retry with its Idempotency-Key has answered with it meanwhile (then it stays and is
        # listed by the housekeeper). Left behind too if Redis fails this: the housekeeper lists it.
        with contextlib.suppress(redis.RedisError):
            if not store().abandon(batch.id):
                return _accepted(batch)
            if idem_name:
                idempotency.release(c.redis, idem_name, claim)
        raise
    return _accepted(batch)


def _accepted(batch):
    response = jsonify(batch.to_api())
    response.status_code = 202
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return response


def _replay(batch_id: str):
    """The answer for a retry: the first request's batch (idempotency.replay), or None."""
    batches = store()
    batch = idempotency.replay(lambda: batches.get(batch_id), confirm=lambda: ctx().confirm_accepted("batch"),
                               vouch=lambda: batches.vouch(batch_id))
    if batch is None:
        return None
    response = jsonify(batch.to_api())
    response.headers["Location"] = f"/v1/batches/{batch_id}"
    return response


@bp.get("/<batch_id>")
def get(batch_id: str):
    return jsonify(_load(batch_id).to_api())


@bp.get("/<batch_id>/documents")
def documents(batch_id: str):
    batch = _load(batch_id)
    if request.args.get("status", "failed") != "failed":
        raise BadRequest("Only status=failed is listed: the others are in the destination.",
                         code="invalid_parameter")
    cursor = request.args.get("cursor", "0")
    if not cursor.isdigit():
        raise BadRequest("cursor must be a number from a previous page.", code="invalid_parameter")
    start = int(cursor)
    items = store().failures(batch.id, start=start, limit=PAGE_LIMIT)
    following = start + len(items) if len(items) == PAGE_LIMIT else None
    return jsonify({"documents": items, "next": None if following is None
                    else f"/v1/batches/{batch.id}/documents?status=failed&cursor={following}"})


@bp.post("/<batch_id>/cancel")
def cancel(batch_id: str):
    c = ctx()
    batch = _load(batch_id)
    batches = store()
    if batches.end(batch.id, "cancelled"):
        for job_id in batches.jobs(batch.id):  # their pages stop; the expander stops at its next document
            c.jobs.cancel(job_id)
        if batch.callback_url:
            from ..broker import DELIVER_BATCH_WEBHOOK_TASK, events_queue

            c.producer.send_task(DELIVER_BATCH_WEBHOOK_TASK, args=[batch.id], queue=events_queue(c.settings))
    c.confirm_changed("batch_cancel")  # as a job's cancel: a 200 no failover can undo
    return jsonify((batches.get(batch.id) or batch).to_api())


def _load(batch_id: str):
    batch = store().get(batch_id) if _BATCH_ID.match(batch_id) else None
    if batch is None or batch.owner != current_owner():
        raise NotFound(f"No batch {batch_id}.", code="not_found")
    return batch
