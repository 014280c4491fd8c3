"""The batched engine off the happy path, on the tiny Qwen2.5-VL on the CPU: a failure costs at most the
page that causes it, every request is resolved exactly once, and an engine that cannot go on says so
(EngineDead) instead of hanging or failing every page it is given."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gnosis_ocr.errors import EngineCheckFailed, EngineDead, PageTimeout
from gnosis_ocr.worker.engines import Cancelled
from gnosis_ocr.worker.engines.decoder import StaticDecoder
from gnosis_ocr.worker.engines.scheduler import Scheduler
from tests.unit.test_batching import page, reference


class Faulty(StaticDecoder):
    """The real decoder, with failures injected where a test says."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_fault = self.prefill_fault = self.release_fault = self.collect_fault = self.seat_fault = None
        self.bind_fault = None
        self.broken = False

    def step(self, batch, length):
        if self.step_fault is not None:
            self.step_fault(self, batch)
        return super().step(batch, length)

    def forward(self, pages, *, stream=None):
        if self.prefill_fault is not None:
            self.prefill_fault(self, pages)
        return super().forward(pages, stream=stream)

    def seat(self, slots, prefilled, rows=None):
        if self.seat_fault is not None:
            self.seat_fault(self, slots)
        return super().seat(slots, prefilled, rows)

    def bind_thread(self, *, steps=False):
        if self.bind_fault is not None:
            self.bind_fault(self)
        super().bind_thread(steps=steps)

    def collect(self, launched):
        if self.collect_fault is not None:
            self.collect_fault(self)
        return super().collect(launched)

    def release(self, slot):
        if self.release_fault is not None:
            self.release_fault(self, slot)
        super().release(slot)

    def healthy(self):
        return not self.broken and super().healthy()


class Deaths(list):
    """The deaths a scheduler reports (its `on_dead`): each comes just after the engine resolved its pages,
    so a test that has seen them resolved waits for the report."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = threading.Event()

    def __call__(self, error: BaseException) -> None:
        self.append(error)
        self.reported.set()

    def one(self, timeout: float = 60) -> bool:
        return self.reported.wait(timeout) and len(self) == 1


@pytest.fixture(scope="module")
def engine(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=24,
                         batch_size=3, prefill_batch=2, repetition_window=0)
    yield eng
    eng.close()


@pytest.fixture(params=["serial", "concurrent"])
def loop(engine, request):
    """A fresh faulty decoder and scheduler on the engine's model; the deaths it reports. Every test runs
    with prefills on the loop's thread and on a thread of their own beside the decode steps."""
    decoder = Faulty(engine.model, slots=3, max_len=engine.max_len)
    deaths = Deaths()
    scheduler = Scheduler(decoder, eos_ids=set(), prefill_batch=2, on_dead=deaths,
                          concurrent=request.param == "concurrent").start()
    scheduler.deaths = deaths
    yield scheduler
    scheduler.stop()


def submit(engine, scheduler, i: int, *, tokens: int = 24, deadline: float | None = None):
    request = engine._request(page(i), max_new_tokens=tokens)
    request.deadline = deadline
    return scheduler.submit(request)


def settle(requests, timeout: float = 60):
    for request in requests:
        assert request.done.wait(timeout), "a request was never resolved"
    assert [r.resolutions for r in requests] == [1] * len(requests), "every request is resolved exactly once"
    return requests


def queue_together(loop, requests: list) -> list:
    """Queue `requests` at once, before the loop takes the first: built one by one, a short page could end,
    or a failure kill the engine, before the others exist."""
    with loop._cond:
        loop._pending.extend(requests)
        loop._cond.notify()
    return requests


def returned_by_a_dead_engine(loop, requests: list) -> None:
    settle(requests)
    assert all(isinstance(r.error, EngineDead) for r in requests), [r.error for r in requests]
    assert loop.deaths.one()


def slot_of(scheduler, request) -> int | None:
    return next((s for s, r in enumerate(scheduler.slots) if r is request), None)


def test_a_step_that_fails_for_one_page_fails_that_page_alone(engine, loop):
    requests = [submit(engine, loop, i) for i in range(3)]
    poison = requests[1]

    def fault(decoder, batch):  # fails whenever the poisoned page takes part in the step
        slot = slot_of(loop, poison)
        if slot is not None and slot < batch and int(decoder.active[slot]) == 1:
            raise RuntimeError("kernel failed on this page's shapes")

    loop.decoder.step_fault = fault
    settle(requests)
    assert isinstance(poison.error, RuntimeError)
    for i, request in enumerate(requests):
        if request is not poison:
            assert request.error is None and request.tokens == reference(engine, page(i), 24), f"page {i}"
    assert loop.alive and not loop.deaths


def test_a_transient_step_failure_costs_no_page(engine, loop):
    failures = iter([True])
    loop.decoder.step_fault = lambda d, b: next(failures, False) and (_ for _ in ()).throw(RuntimeError("blip"))
    requests = settle([submit(engine, loop, i) for i in range(3)])
    assert [r.error for r in requests] == [None] * 3
    assert all(r.tokens == reference(engine, page(i), 24) for i, r in enumerate(requests))
    assert loop.failed_steps == 1 and loop.alive


def test_a_step_that_fails_after_the_last_pages_ended_costs_nothing(engine, loop):
    # The third step is launched while the second, which ends the page, is still running: the launch fails,
    # the second step is read, and the page has ended, so there is no page left to suspect.
    failures = iter([True])

    def fault(decoder, batch):
        if loop.steps == 1 and next(failures, False):
            raise RuntimeError("blip")

    loop.decoder.step_fault = fault
    request = settle([submit(engine, loop, 0, tokens=3)])[0]
    assert request.error is None and request.tokens == reference(engine, page(0), 24)[:3]
    assert loop.failed_steps == 1 and loop.alive and not loop.deaths
    assert settle([submit(engine, loop, 1)])[0].tokens == reference(engine, page(1), 24), "it goes on serving"


def test_a_failing_metrics_recorder_costs_no_page_and_no_step(engine, loop):
    def broken(phase, pages, seconds):
        raise ValueError("the metrics directory is gone")

    loop.on_work = broken
    requests = settle([submit(engine, loop, i) for i in range(3)])
    assert [r.error for r in requests] == [None] * 3
    assert all(r.tokens == reference(engine, page(i), 24) for i, r in enumerate(requests))
    assert loop.failed_steps == loop.failed_prefills == 0 and loop.alive


def test_a_prefill_that_fails_for_one_page_of_a_chunk_fails_that_page_alone(engine, loop):
    twins = [engine._request(page(0), max_new_tokens=24) for _ in range(2)]  # one length: one chunk
    poison_pixels = twins[1].inputs["pixel_values"] = twins[1].inputs["pixel_values"] * 0.5

    def fault(decoder, pages):
        if any(torch.equal(p["pixel_values"], poison_pixels) for p in pages):
            raise ValueError("this page's image breaks the vision tower")

    loop.decoder.prefill_fault = fault
    for request in twins:
        loop.submit(request)
    settle(twins)
    assert twins[0].error is None and twins[0].tokens == reference(engine, page(0), 24)
    assert isinstance(twins[1].error, ValueError)
    assert loop.failed_prefills >= 2 and loop.alive


def test_a_prefill_out_of_memory_retries_smaller_and_loses_nothing(engine, loop):
    def fault(decoder, pages):
        if len(pages) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    loop.decoder.prefill_fault = fault
    requests = [engine._request(page(0), max_new_tokens=24) for _ in range(2)]
    for request in requests:
        loop.submit(request)
    settle(requests)
    assert [r.error for r in requests] == [None, None]
    assert all(r.tokens == reference(engine, page(0), 24) for r in requests)
    assert loop.prefill_batch == 1, "later prefills are smaller"


def test_a_failed_seat_fails_its_pages_alone(engine, loop):
    """Copying a prefill into its slots fails once (the device still answers): those pages fail, the
    others decode as alone, and each is resolved once."""
    failures = iter([True])
    loop.decoder.seat_fault = lambda d, slots: next(failures, False) and (_ for _ in ()).throw(
        RuntimeError("copy into the cache failed"))
    requests = settle([submit(engine, loop, i) for i in range(3)])
    failed = [r for r in requests if r.error is not None]
    assert len(failed) == 1 and isinstance(failed[0].error, RuntimeError), [r.error for r in requests]
    for i, request in enumerate(requests):
        if request.error is None:
            assert request.tokens == reference(engine, page(i), 24), f"page {i}"
    assert loop.alive and not loop.deaths and loop.failed_prefills == 1


def test_a_prefill_thread_that_cannot_use_the_device_kills_the_engine_and_returns_every_page(engine):
    def fault(decoder):
        if threading.current_thread().name.endswith("-prefill"):
            raise RuntimeError("CUDA error: invalid device ordinal")

    decoder = Faulty(engine.model, slots=3, max_len=engine.max_len)
    decoder.bind_fault = fault
    deaths = Deaths()
    loop = Scheduler(decoder, eos_ids=set(), prefill_batch=2, on_dead=deaths, concurrent=True)
    requests = [submit(engine, loop, i) for i in range(3)]  # queued before it starts: a dead loop takes none
    loop.start()
    try:
        settle(requests)
        assert all(isinstance(r.error, EngineDead) for r in requests), [r.error for r in requests]
        assert deaths.one() and not loop.alive
    finally:
        loop.stop()


def test_a_device_that_stops_answering_kills_the_engine_and_returns_every_page(engine, loop):
    requests = [submit(engine, loop, i, tokens=2000) for i in range(5)]  # 3 decoding, 2 waiting

    def fault(decoder, batch):
        if loop.steps >= 3:
            decoder.broken = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    loop.decoder.step_fault = fault
    settle(requests)
    assert all(isinstance(r.error, EngineDead) for r in requests), [r.error for r in requests]
    assert loop.deaths.one() and not loop.alive
    with pytest.raises(EngineDead):
        submit(engine, loop, 0)


def test_a_step_whose_result_cannot_be_read_kills_the_engine_and_returns_every_page(engine, loop):
    requests = [submit(engine, loop, i, tokens=2000) for i in range(5)]  # 3 decoding, 2 waiting

    def fault(decoder):  # the step ran on the device, but what it computed never reaches the host
        if loop.steps >= 3:
            raise RuntimeError("CUDA error: unspecified launch failure")

    loop.decoder.collect_fault = fault
    settle(requests)
    assert all(isinstance(r.error, EngineDead) for r in requests), [r.error for r in requests]
    assert loop.deaths.one() and not loop.alive


def test_the_next_step_is_launched_before_the_last_one_is_read(engine, loop):
    """The host's work on a step's tokens overlaps the device's next step (bench/engine_host.py measures
    what that saves); the pages still decode exactly as alone."""
    events: list[str] = []
    loop.decoder.step_fault = lambda d, b: events.append("launch")
    loop.decoder.collect_fault = lambda d: events.append("read")
    requests = settle([submit(engine, loop, i) for i in range(3)])
    assert all(r.error is None and r.tokens == reference(engine, page(i), 24) for i, r in enumerate(requests))
    assert "launch launch read" in " ".join(events), events[:12]
    assert events.count("launch") == events.count("read"), "every launched step is read"


def test_a_failing_write_after_a_page_ends_kills_the_engine_and_returns_the_others(engine, loop):
    def release_fault(decoder, slot):  # freeing the finished page's slot is the first write to fail
        raise RuntimeError("CUDA error: unspecified launch failure")

    loop.decoder.release_fault = release_fault
    requests = queue_together(loop, [engine._request(page(0), max_new_tokens=5)]
                              + [engine._request(page(i), max_new_tokens=2000) for i in (1, 2, 3)])
    settle(requests)
    assert requests[0].error is None and len(requests[0].tokens) == 5, "the finished page keeps its text"
    assert all(isinstance(r.error, EngineDead) for r in requests[1:]), [r.error for r in requests]
    assert loop.deaths.one() and not loop.alive


def test_a_prefill_that_leaves_the_device_unusable_kills_the_engine_and_returns_every_page(engine, loop):
    def fault(decoder, pages):  # a sticky CUDA error inside the vision tower: every later call fails too
        decoder.broken = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    loop.decoder.prefill_fault = fault
    returned_by_a_dead_engine(loop, queue_together(loop, [engine._request(page(i), max_new_tokens=24)
                                                        for i in range(3)]))


def test_a_failure_while_recovering_from_a_failed_seat_kills_the_engine(engine, loop):
    loop.decoder.seat_fault = lambda d, s: (_ for _ in ()).throw(RuntimeError("copy into the cache failed"))
    loop.decoder.release_fault = lambda d, s: (_ for _ in ()).throw(RuntimeError("CUDA error: ECC error"))
    returned_by_a_dead_engine(loop, queue_together(loop, [engine._request(page(i), max_new_tokens=24)
                                                        for i in range(3)]))


def test_a_batch_in_which_every_page_fails_alone_is_a_broken_engine_not_bad_pages(engine, loop):
    loop.decoder.step_fault = lambda d, b: loop.steps >= 1 and (_ for _ in ()).throw(RuntimeError("always"))
    # Of one prompt length and queued together: pages of other lengths, or arriving one by one, can be
    # seated one at a time where prefills run beside the steps, and then each decodes, and fails, alone.
    returned_by_a_dead_engine(loop, queue_together(loop, [engine._request(page(0), max_new_tokens=2000)
                                                        for _ in range(3)]))


def test_cancelled_and_expired_pages_leave_the_queue_while_every_slot_is_busy(engine):
    # Room for thousands of tokens: the busy pages stay busy until cancelled.
    loop = Scheduler(Faulty(engine.model, slots=3, max_len=engine.max_len + 4000), eos_ids=set(),
                     prefill_batch=2).start()
    busy = [submit(engine, loop, i, tokens=100_000) for i in range(3)]
    cancelled = submit(engine, loop, 3)
    late = submit(engine, loop, 4, deadline=time.monotonic() + 0.2)
    cancelled.cancel()
    assert cancelled.done.wait(10) and isinstance(cancelled.error, Cancelled)
    assert late.done.wait(10) and isinstance(late.error, PageTimeout)
    assert not any(r.done.is_set() for r in busy), "they left while every slot was still busy"
    for request in busy:
        request.cancel()
    settle([*busy, cancelled, late])
    loop.stop()


def test_a_stuck_loop_never_holds_a_page_past_its_deadline_and_grace(engine, tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    deaths: list[BaseException] = []
    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=24,
                         batch_size=2, repetition_window=0, stall_grace=0.5, on_dead=deaths.append)
    release = threading.Event()
    scheduler = eng.schedulers[0]
    step = scheduler.decoder.step
    scheduler.decoder.step = lambda *a: release.wait(60) and step(*a)  # the loop hangs inside a device call
    try:
        started = time.monotonic()
        with pytest.raises(EngineDead, match="stopped making progress"):
            eng.recognize(page(0), deadline=time.monotonic() + 0.5)
        assert time.monotonic() - started < 10
        assert eng.dead is not None and len(deaths) == 1
        with pytest.raises(EngineDead):
            eng.recognize(page(1), deadline=time.monotonic() + 5)
    finally:
        release.set()
        eng.close()


def test_a_cancelled_check_that_raises_neither_loses_the_page_nor_runs_it_on(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=100_000,
                         batch_size=1, repetition_window=0)
    answers = iter([ConnectionError("Redis is restarting"), ConnectionError("still restarting"), True])

    def cancelled() -> bool:  # Redis fails twice, then says the job was cancelled
        answer = next(answers, True)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    try:
        with pytest.raises(Cancelled):
            eng.recognize(page(0), deadline=time.monotonic() + 120, cancelled=cancelled)
        assert next(answers, None) is None, "asked again after each error"
        assert eng.schedulers[0].load() == 0, "the page left the batch"
    finally:
        eng.close()


def test_a_graph_that_does_not_reproduce_the_eager_step_stops_the_engine_at_start(tiny_model, monkeypatch):
    from gnosis_ocr.worker.engines import decoder as decoder_module
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    # A graph captured on the wrong device replays nothing: the step returns without computing.
    monkeypatch.setattr(decoder_module.StaticDecoder, "step", lambda self, b, L: self.next_tokens[:b])
    with pytest.raises(EngineCheckFailed, match="does not reproduce the eager step"):
        NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=8,
                       batch_size=2, repetition_window=0)


def test_the_start_up_check_passes_and_is_reported(engine):
    assert [c["identical"] for c in engine.checks] == [True]
