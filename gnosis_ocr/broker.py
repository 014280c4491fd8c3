"""Celery's configuration, shared by the API (which only sends) and the workers.

Both sides build it from the same settings, so the broker's visibility timeout
is the same wherever kombu reads it.
"""

from __future__ import annotations

import base64
import json

from celery import Celery

from . import defaults
from .redisconn import celery_broker
from .settings import Settings

OCR_PAGE_TASK = "gnosis.ocr_page"
WARM_CACHE_TASK = "gnosis.warm_cache"
DELIVER_WEBHOOK_TASK = "gnosis.deliver_webhook"
EXPAND_BATCH_TASK = "gnosis.expand_batch"
DELIVER_BATCH_WEBHOOK_TASK = "gnosis.deliver_batch_webhook"
CACHE_QUEUE_SUFFIX = ".cache"
EVENTS_QUEUE_SUFFIX = ".events"


PRIORITY_STEPS = (0, 3, 6, 9)
"""The Redis transport keeps one list per step and pops the lowest number first."""

PRIORITY_SEP = "\x06\x16"
"""kombu's separator between a queue's name and its priority step in the list's key."""


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding a queue's messages, highest priority first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def task_args(raw: bytes, task: str) -> list | None:
    """The positional arguments of a message as kombu's Redis transport stores it (in a queue's list, or
    the first element of an unacked entry), if it runs `task`; None for other tasks and bad JSON."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != task:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return list(args)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def page_priority(backlog: int) -> int:
    """A page's priority from its submitter's pages still to do (this job's included): a key with a
    few pages goes ahead of one with thousands, so pages of different keys interleave."""
    for step, bound in zip(PRIORITY_STEPS, (10, 100, 1000), strict=False):
        if backlog <= bound:
            return step
    return PRIORITY_STEPS[-1]


def celery_config(settings: Settings) -> dict:
    transport = {
        "priority_steps": list(PRIORITY_STEPS),
        "sep": PRIORITY_SEP,
        "queue_order_strategy": "priority",
        # Must outlast the hard time limit, or a long page is redelivered while it still runs.
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        # Without it a command on a connection whose path died silently (an ack, a publish) waits for ever.
        "socket_timeout": settings.redis_timeout,
        "health_check_interval": defaults.BROKER_HEALTH_CHECK_INTERVAL,
        "retry_on_timeout": True,
    }
    broker_url, extra = celery_broker(settings.redis_url)
    transport.update(extra)
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_connection_timeout": settings.redis_timeout,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,  # the job record is ours, not Celery's PENDING
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A page running when the broker connection drops goes on and records its text (our own Redis client
        # retries); a delivery of its message that kombu restores meanwhile finds it recorded and ends. Celery
        # 6 turns this on by default, which would throw away every page in flight (GPU minutes each) and run
        # it again at each connection blip.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.page_soft_timeout,
        "task_time_limit": settings.page_hard_timeout,
        "task_default_queue": settings.queue,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        # Worker task events feed Flower; "sent" events are off: each would double the cost of a publish.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def make_producer(settings: Settings) -> Celery:
    """A Celery app that only sends tasks by name: it imports no task code, no engine, no torch."""
    app = Celery("gnosis-ocr-api", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def cache_queue(settings: Settings) -> str:
    return settings.queue + CACHE_QUEUE_SUFFIX


def events_queue(settings: Settings) -> str:
    """Webhook deliveries: their own queue, so they never wait behind minutes-long pages."""
    return settings.queue + EVENTS_QUEUE_SUFFIX
