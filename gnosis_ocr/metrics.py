"""Cluster-wide counters and histograms kept in Redis, exported in Prometheus text by the API.

Workers run on many hosts and their pool children come and go, so per-process
registries would lose counts on every restart and need every host scraped.
Recording into Redis (one HINCRBYFLOAT per event) gives one scrape with totals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

log = logging.getLogger(__name__)

KEY_COUNTERS = "gnosis:metrics:counters"
KEY_HISTOGRAMS = "gnosis:metrics:histograms"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

COUNTERS = {
    "gnosis_jobs_submitted_total": "Jobs accepted by the API.",
    "gnosis_jobs_finished_total": "Jobs that reached a final state, by outcome and error code.",
    "gnosis_pages_processed_total": "Pages recognised, by engine.",
    "gnosis_cache_hits_total": "Model loads that found a complete, valid cache.",
    "gnosis_cache_misses_total": "Model loads that found the cache absent or invalid.",
    "gnosis_cache_bytes_downloaded_total": "Bytes of model files fetched from the hub.",
    "gnosis_cache_downloads_total": "Model downloads run, by outcome.",
    "gnosis_worker_recoveries_total": "Pages requeued after their worker stopped heartbeating.",
}

HISTOGRAMS = {
    "gnosis_job_duration_seconds": ("Submit to final state.", _LATENCY_BUCKETS),
    "gnosis_page_duration_seconds": ("One page's OCR, render included.", _LATENCY_BUCKETS),
    "gnosis_cache_lock_wait_seconds": ("Time a worker waited for another's download.", _LATENCY_BUCKETS),
    "gnosis_cache_download_seconds": ("Duration of the one download.", _LATENCY_BUCKETS),
    "gnosis_model_load_seconds": ("Model load time per worker process.", _LATENCY_BUCKETS),
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
    """Record events. Metrics never fail the caller: a Redis error is logged and dropped."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        assert name in COUNTERS, name
        try:
            self.redis.hincrbyfloat(KEY_COUNTERS, _field(name, labels), amount)
        except redis.RedisError as exc:
            log.debug("metric %s dropped: %s", name, exc)

    def observe(self, name: str, value: float, **labels: str) -> None:
        _, buckets = HISTOGRAMS[name]
        base = _field(name, labels)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for bound in buckets:
                if value <= bound:
                    pipe.hincrby(KEY_HISTOGRAMS, f"{base}|{bound}", 1)
            pipe.hincrby(KEY_HISTOGRAMS, f"{base}|+Inf", 1)
            pipe.hincrbyfloat(KEY_HISTOGRAMS, f"{base}|sum", value)
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("metric %s dropped: %s", name, exc)


class RedisCollector:
    """A prometheus_client collector reading the shared counters at scrape time."""

    def __init__(self, client: redis.Redis, extra: Iterable = ()) -> None:
        self.redis = client
        self.extra = list(extra)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        counters = {k.decode(): float(v) for k, v in self.redis.hgetall(KEY_COUNTERS).items()}
        histograms = {k.decode(): float(v) for k, v in self.redis.hgetall(KEY_HISTOGRAMS).items()}
        for name, help_text in COUNTERS.items():
            series = [(k.split("|", 1)[1], v) for k, v in counters.items() if k.split("|", 1)[0] == name]
            keys = sorted({label for raw, _ in series for label in _parse_labels(raw)})
            family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=keys)
            for raw, value in series:
                labels = _parse_labels(raw)
                family.add_metric([labels.get(k, "") for k in keys], value)
            yield family
        for name, (help_text, buckets) in HISTOGRAMS.items():
            by_labels: dict[str, dict[str, float]] = {}
            for key, value in histograms.items():
                metric, raw, bound = key.split("|")
                if metric == name:
                    by_labels.setdefault(raw, {})[bound] = value
            keys = sorted({label for raw in by_labels for label in _parse_labels(raw)})
            family = HistogramMetricFamily(name, help_text, labels=keys)
            for raw, values in by_labels.items():
                labels = _parse_labels(raw)
                cumulative = [(str(float(b)) if b != "+Inf" else "+Inf", values.get(str(b), 0.0))
                              for b in (*buckets, "+Inf")]
                family.add_metric([labels.get(k, "") for k in keys], cumulative, values.get("sum", 0.0))
            yield family
        for collect in self.extra:
            yield from collect()
