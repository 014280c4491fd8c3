"""Cluster-wide counters and histograms kept in Redis, exported in Prometheus text by the API.

Workers run on many hosts and their pool children come and go, so per-process
registries would lose counts on every restart and need every host scraped.
Recording into Redis (HINCRBYFLOAT) gives one scrape with totals. A process adds its events up and
writes them once a second in one pipeline, one increment per series and bucket: a page's histograms
alone touch 40 fields, so written one event at a time a busy GPU worker sent Redis 40 commands a page
(`bench/service_host.py` counts the service's Redis commands per page).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Iterable

import redis

from . import keys

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

COUNTERS = {
    "gnosis_jobs_submitted_total": "Jobs accepted by the API.",
    "gnosis_submissions_unreplicated_total": "Jobs and batches refused, and cancels and deletions answered 503, "
    "because Redis replicas did not confirm them in time (GNOSIS_ACCEPT_REPLICAS), by kind.",
    "gnosis_jobs_finished_total": "Jobs that reached a final state, by outcome and error code.",
    "gnosis_pages_processed_total": "Pages recognised, by engine.",
    "gnosis_cache_hits_total": "Model loads that found a complete, valid cache.",
    "gnosis_cache_misses_total": "Model loads that found the cache absent or invalid.",
    "gnosis_cache_bytes_downloaded_total": "Bytes of model files fetched from the hub.",
    "gnosis_cache_downloads_total": "Model downloads run, by outcome.",
    "gnosis_worker_recoveries_total": "Pages requeued after their worker stopped heartbeating.",
    "gnosis_engine_deaths_total": "GPU engines that died (a device left unusable, a dead or stuck loop); each "
                                  "restarted its worker and returned its pages to the queue.",
    "gnosis_pages_republished_total": "Pages published again because no message or worker had them any more.",
    "gnosis_housekeeping_failures_total": "Housekeeping duties (reap, expire, reconcile, batches, webhooks, inputs, "
                                          "sweep) that failed with an error other than Redis's, by duty.",
    "gnosis_webhooks_republished_total": "Owed webhooks published again from the outbox (their task was lost).",
    "gnosis_batch_listings_republished_total": "Batch listings run again because no worker was listing them.",
    "gnosis_batch_documents_total": "Documents of batches by outcome (done, failed, skipped).",
    "gnosis_bucket_failures_total": "Bucket calls of batches that failed for now, past GNOSIS_BUCKET_TIMEOUT, "
                                    "by operation (list, read, write); each was handed back or left owed.",
    "gnosis_output_tokens_total": "Tokens a generating engine wrote for recorded pages (rate() is tokens/s).",
    "gnosis_pages_truncated_total": "Pages whose output was cut short, by reason (max_tokens, repetition).",
}

HISTOGRAMS = {
    "gnosis_job_duration_seconds": ("Submit to final state.", _LATENCY_BUCKETS),
    "gnosis_page_duration_seconds": ("One page's OCR, render included.", _LATENCY_BUCKETS),
    "gnosis_cache_lock_wait_seconds": ("Time a worker waited for another's download.", _LATENCY_BUCKETS),
    "gnosis_cache_download_seconds": ("Duration of the one download.", _LATENCY_BUCKETS),
    "gnosis_model_load_seconds": ("Model load time per worker process.", _LATENCY_BUCKETS),
    "gnosis_page_queue_wait_seconds": ("A page's wait in its engine before a batch slot took it.",
                                       _LATENCY_BUCKETS),
    "gnosis_page_first_token_seconds": ("A page handed to the engine until its first output token.",
                                        _LATENCY_BUCKETS),
}


def _field(name: str, labels: dict[str, str] | None) -> str:
    if not labels:
        return name + "|"
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _parse_labels(raw: str) -> dict[str, str]:
    if not raw:
        return {}
    return dict(part.split("=", 1) for part in raw.split(","))


class Metrics:
    """Record events. Metrics never fail the caller: a Redis error is logged and dropped.

    With `background=True` events are added up and written by a thread in one pipeline every
    `interval` seconds, so a page or a request never waits on metric writes.
    """

    def __init__(self, client: redis.Redis, *, background: bool = False, interval: float = 1.0) -> None:
        self.redis = client
        self.background = background
        self.interval = interval
        self._reset()

    def _reset(self) -> None:
        # Also after a fork: the parent's lock, buffer and thread do not carry over.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], float] = {}  # (kind, field): the amount to add
        self._thread: threading.Thread | None = None

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        assert name in COUNTERS, name
        self._record([("c", _field(name, labels), amount)])

    def observe(self, name: str, value: float, **labels: str) -> None:
        _, buckets = HISTOGRAMS[name]
        base = _field(name, labels)
        ops = [("h", f"{base}|{bound}", 1) for bound in buckets if value <= bound]
        ops += [("h", f"{base}|+Inf", 1), ("h", f"{base}|sum", value)]
        self._record(ops)

    def _record(self, ops: list[tuple[str, str, float]]) -> None:
        if not self.background:
            self._write(ops)
            return
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            for kind, field, amount in ops:
                self._pending[kind, field] = self._pending.get((kind, field), 0.0) + amount
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gnosis-metrics", daemon=True)
                self._thread.start()
                atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)  # a flush period, not a synchronisation
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if pending:
            self._write([(kind, field, amount) for (kind, field), amount in pending.items()])

    def _write(self, ops: list[tuple[str, str, float]]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for kind, field, amount in ops:
                pipe.hincrbyfloat(keys.METRIC_COUNTERS if kind == "c" else keys.METRIC_HISTOGRAMS, field, amount)
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("%d metric updates dropped: %s", len(ops), exc)


class RedisCollector:
    """A prometheus_client collector reading the shared counters at scrape time."""

    def __init__(self, client: redis.Redis, extra: Iterable = ()) -> None:
        self.redis = client
        self.extra = list(extra)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        counters = {k.decode(): float(v) for k, v in self.redis.hgetall(keys.METRIC_COUNTERS).items()}
        histograms = {k.decode(): float(v) for k, v in self.redis.hgetall(keys.METRIC_HISTOGRAMS).items()}
        for name, help_text in COUNTERS.items():
            series = [(k.split("|", 1)[1], v) for k, v in counters.items() if k.split("|", 1)[0] == name]
            names = sorted({label for raw, _ in series for label in _parse_labels(raw)})
            family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=names)
            for raw, value in series:
                labels = _parse_labels(raw)
                family.add_metric([labels.get(k, "") for k in names], value)
            yield family
        for name, (help_text, buckets) in HISTOGRAMS.items():
            by_labels: dict[str, dict[str, float]] = {}
            for key, value in histograms.items():
                metric, raw, bound = key.split("|")
                if metric == name:
                    by_labels.setdefault(raw, {})[bound] = value
            names = sorted({label for raw in by_labels for label in _parse_labels(raw)})
            family = HistogramMetricFamily(name, help_text, labels=names)
            for raw, values in by_labels.items():
                labels = _parse_labels(raw)
                cumulative = [(str(float(b)) if b != "+Inf" else "+Inf", values.get(str(b), 0.0))
                              for b in (*buckets, "+Inf")]
                family.add_metric([labels.get(k, "") for k in names], cumulative, values.get("sum", 0.0))
            yield family
        for collect in self.extra:
            yield from collect()
