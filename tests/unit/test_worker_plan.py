"""Which worker `gnosis-ocr worker` starts for which settings and arguments, decided before anything
runs: the GPU engine as one threads pool fed to each device's batch, CPU engines as processes, the
light worker on its own queues."""

from __future__ import annotations

from gnosis_ocr.settings import Settings
from gnosis_ocr.worker import plan


def test_the_gpu_engine_is_one_process_whose_threads_feed_its_batches():
    settings = Settings(engine="nanonets", prefetch_pages=4, queue="ocr")
    p = plan.make(settings, concurrency=3, cores=12)
    assert (p.batched, p.pool, p.concurrency, p.queues) == (True, "threads", 4, ("ocr",))
    assert p.sidecar and p.check_cache and p.threads == 4
    # Asked for processes, it gets processes, each with its own engine.
    forked = plan.make(settings, pool="prefork", concurrency=2)
    assert (forked.batched, forked.pool, forked.concurrency) == (False, "prefork", 2)


def test_a_cpu_engine_shares_the_cores_among_its_processes_unless_told_its_threads():
    p = plan.make(Settings(engine="tesseract"), concurrency=4, cores=8)
    assert (p.batched, p.pool, p.concurrency, p.threads, p.check_cache) == (False, None, 4, 2, False)
    assert plan.make(Settings(engine="tesseract", threads=3), concurrency=4, cores=8).threads == 3


def test_the_light_worker_consumes_only_warm_ups_and_webhooks():
    p = plan.make(Settings(engine="nanonets", queue="ocr"), light=True, concurrency=32)
    assert p.light and not p.batched and not p.sidecar and not p.check_cache
    assert p.pool == "threads" and "ocr" not in p.queues and len(p.queues) == 2
