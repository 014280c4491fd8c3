"""Cluster-wide metrics in Redis (metrics.py): what a scrape of /metrics reads, and what recording costs
Redis, on a private redis-server whose command counts are this test's alone."""

from __future__ import annotations

import pytest
import redis

from gnosis_ocr.metrics import _LATENCY_BUCKETS, Metrics, RedisCollector
from harness.redisproc import PrivateRedis


@pytest.fixture
def private(tmp_path):
    server = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    yield redis.Redis.from_url(server.url)
    server.stop()


def hincrbyfloat_calls(client: redis.Redis) -> int:
    return client.info("commandstats").get("cmdstat_hincrbyfloat", {}).get("calls", 0)


def scraped(client: redis.Redis) -> dict[str, dict]:
    return {family.name: family for family in RedisCollector(client).collect()}


def test_a_busy_process_sends_one_increment_per_series_and_the_scrape_counts_every_event(private):
    metrics = Metrics(private, background=True, interval=3600)  # flushed by the test, as its thread would
    durations = [0.3 + i * 0.37 for i in range(100)]  # 100 pages between 0.3 s and 37 s
    for seconds in durations:
        metrics.observe("gnosis_page_duration_seconds", seconds, engine="nanonets")
        metrics.inc("gnosis_pages_processed_total", engine="nanonets")
        metrics.inc("gnosis_output_tokens_total", 1100, engine="nanonets")
    metrics.flush()

    # One per bucket the pages reached, +Inf, the sum, and the two counters: not one per page and field.
    reached = sum(1 for bound in _LATENCY_BUCKETS if min(durations) <= bound)
    assert hincrbyfloat_calls(private) == reached + 2 + 2

    families = scraped(private)
    [processed] = families["gnosis_pages_processed"].samples
    assert processed.value == 100
    [tokens] = families["gnosis_output_tokens"].samples
    assert tokens.value == 110_000
    histogram = {(s.name, s.labels.get("le")): s.value for s in families["gnosis_page_duration_seconds"].samples}
    assert histogram["gnosis_page_duration_seconds_count", None] == 100
    assert histogram["gnosis_page_duration_seconds_sum", None] == pytest.approx(sum(durations))
    for bound in _LATENCY_BUCKETS:
        assert histogram["gnosis_page_duration_seconds_bucket", str(float(bound))] == sum(
            d <= bound for d in durations), bound


def test_events_recorded_while_redis_is_down_are_dropped_without_failing_the_caller(tmp_path):
    server = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    metrics = Metrics(client, background=True, interval=3600)
    server.stop()
    metrics.inc("gnosis_jobs_submitted_total")
    metrics.flush()  # logged and dropped: a metric never fails a page or a request
    server.start()
    metrics.inc("gnosis_jobs_submitted_total")
    metrics.flush()
    [submitted] = scraped(client)["gnosis_jobs_submitted"].samples
    assert submitted.value == 1
    server.stop()
