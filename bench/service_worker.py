"""`gnosis-ocr worker` with output lengths forced to a fixed mix, for the whole-service GPU benchmark.

Random weights would stop pages at random places (or never): the benchmark needs each page to write
exactly its share of a known mix. Each page takes the next length of GNOSIS_BENCH_LENGTHS and stops
there as if it had written EOS; nothing else of the worker changes.

    GNOSIS_BENCH_LENGTHS=300,600,900,1100,1400,2200 python -m bench.service_worker worker
"""

from __future__ import annotations

import itertools
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def patch(lengths: list[int]) -> None:
    from gnosis_ocr.worker.engines import nanonets, scheduler

    cycle = itertools.cycle(lengths)
    lock = threading.Lock()
    make_request = nanonets.NanonetsEngine._request

    def forced(self, page, *, max_new_tokens=None):
        if max_new_tokens is None:
            with lock:
                max_new_tokens = next(cycle)
        return make_request(self, page, max_new_tokens=max_new_tokens)

    nanonets.NanonetsEngine._request = forced
    init = scheduler.Scheduler.__init__

    def no_eos(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.eos_ids = set()

    scheduler.Scheduler.__init__ = no_eos


def standin(spec: str) -> None:
    """Each device's decoder replaced by bench/engine_host.py's stand-in ("step ms for 1 page, for 64,
    prefill ms per page[, ms per prefill whatever its pages[, contention of a concurrent prefill]]"): the
    whole service at a GPU's speed, on any machine. Only the device's work is simulated; the processor,
    scheduler, Celery, Redis and the API are the real ones."""
    from bench.engine_host import DeviceStandIn
    from gnosis_ocr.worker.engines import nanonets

    one, full, prefill, *more = (float(x) for x in spec.split(","))
    chunk, contention = (more + [0.0, 1.0][len(more):])[:2]

    def decoder(model, *, slots, **options):
        return DeviceStandIn(slots, step_ms=(one, full), prefill_ms=prefill, chunk_ms=chunk, contention=contention)

    nanonets.StaticDecoder = decoder
    nanonets.NanonetsEngine.warm_up = lambda self, max_side: None  # nothing to capture
    nanonets.NanonetsEngine._batch_vision = lambda self, model, max_side: None


if __name__ == "__main__":
    patch([int(n) for n in os.environ["GNOSIS_BENCH_LENGTHS"].split(",")])
    if os.environ.get("GNOSIS_BENCH_STANDIN"):
        standin(os.environ["GNOSIS_BENCH_STANDIN"])
    from gnosis_ocr.cli import main

    sys.exit(main(sys.argv[1:]))
