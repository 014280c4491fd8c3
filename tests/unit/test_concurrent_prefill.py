"""Prefills beside the decode steps (`OCR_PREFILL_CONCURRENT`, `engines/prefill.py`), on the tiny
Qwen2.5-VL on the CPU, where the prefill thread's torch calls really run while the loop's do: pages in
flight go on decoding while a page's prefill runs, every page still decodes exactly as alone, and a
page being prefilled is resolved exactly once, whether its job is cancelled or the engine dies meanwhile.
(The fault tests in test_engine_faults.py run with prefills both ways.)"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from gnosis_ocr.errors import EngineDead
from gnosis_ocr.worker.engines import Cancelled, prefill
from gnosis_ocr.worker.engines.scheduler import Scheduler
from tests.unit.test_batching import page, recognize_from_threads, reference, wait
from tests.unit.test_engine_faults import Faulty


@pytest.fixture(scope="module")
def engine(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=32,
                         batch_size=3, prefill_batch=2, prefill_gather=0, repetition_window=0,
                         prefill_concurrent="on")
    yield eng
    eng.close()


class Gate:
    """Holds the prefill of one page (told by its pixels) until opened; says when that prefill began."""

    def __init__(self, request) -> None:
        self.pixels = request.inputs["pixel_values"]
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self, decoder, pages) -> None:
        if any(p["pixel_values"] is self.pixels for p in pages):
            self.entered.set()
            assert self.opened.wait(60), "the test never opened the gate"


@pytest.fixture
def loop(engine):
    scheduler = Scheduler(Faulty(engine.model, slots=3, max_len=engine.max_len + 400), eos_ids=set(),
                          prefill_batch=2, concurrent=True).start()
    yield scheduler
    scheduler.stop()


def until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.002)  # polling the loop's state: it has no event for this


def test_the_engine_runs_prefills_beside_the_decode_steps_and_says_so(engine):
    scheduler = engine.schedulers[0]
    assert scheduler.concurrent and engine.attention_paths["cpu"]["prefill"] == "concurrent"
    assert scheduler.stream_check["identical"], scheduler.stream_check


def hold_beside_a_running_page(engine, loop, tokens: int):
    """A page of `tokens` seated and decoding, then another whose prefill is held: both, and the gate."""
    running = loop.submit(engine._request(page(0), max_new_tokens=tokens))
    until(lambda: running.first_token is not None)
    held = engine._request(page(1), max_new_tokens=24)
    gate = loop.decoder.prefill_fault = Gate(held)
    loop.submit(held)
    assert gate.entered.wait(60)
    return running, held, gate


def test_a_page_in_flight_decodes_to_its_end_while_another_pages_prefill_runs(engine, loop):
    running, held, gate = hold_beside_a_running_page(engine, loop, 24)
    # The held prefill blocks nothing but itself: the seated page decodes all its tokens meanwhile.
    assert wait(running).error is None and running.tokens == reference(engine, page(0), 24)
    assert not held.done.is_set() and held.first_token is None
    gate.opened.set()
    assert wait(held).error is None and held.tokens == reference(engine, page(1), 24)


def test_pages_from_many_threads_decode_exactly_as_alone(engine):
    """Ragged pages, more than the slots, arriving from threads: prefills and steps interleave in every
    order, and each page's tokens are still `generate`'s."""
    results = recognize_from_threads(engine, 7, timeout=120)
    for i, text in results.items():
        expected = engine.page_prompt.decode(reference(engine, page(i), 32))
        assert text.text == expected, f"page {i}"


def test_a_page_cancelled_while_its_prefill_runs_leaves_once_and_its_slot_serves_the_next(engine, loop):
    held = engine._request(page(2), max_new_tokens=24)
    gate = loop.decoder.prefill_fault = Gate(held)
    loop.submit(held)
    assert gate.entered.wait(60)
    held.cancel()
    gate.opened.set()
    assert isinstance(wait(held).error, Cancelled) and held.resolutions == 1
    until(lambda: not any(loop.slots))
    after = loop.submit(engine._request(page(2), max_new_tokens=24))
    assert wait(after).error is None and after.tokens == reference(engine, page(2), 24)


def test_an_engine_that_dies_during_a_prefill_resolves_that_page_once(engine, loop):
    running, held, gate = hold_beside_a_running_page(engine, loop, 100_000)
    loop.kill(EngineDead("the device was lost"))  # as a page thread does when the loop stops answering
    assert isinstance(wait(held).error, EngineDead) and isinstance(wait(running).error, EngineDead)
    gate.opened.set()  # the prefill ends after its page was handed back: nothing is resolved twice
    loop.stop()
    assert held.resolutions == 1 and running.resolutions == 1


def test_a_prefill_stream_that_does_not_reproduce_the_forward_is_not_used(tiny_model, monkeypatch, caplog):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    def differs(decoder, pages, stream):
        return {"device": str(decoder.device), "identical": False, "max_abs_diff": 0.5}

    monkeypatch.setattr(prefill, "check_stream", differs)
    monkeypatch.setattr("gnosis_ocr.worker.engines.scheduler.check_stream", differs)
    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=8,
                         batch_size=2, repetition_window=0, prefill_concurrent="on")
    try:
        assert not eng.schedulers[0].concurrent and eng.attention_paths["cpu"]["prefill"] == "serial"
        assert "stay on the engine loop's thread" in caplog.text
        assert eng.recognize(page(0)).text == eng.page_prompt.decode(reference(eng, page(0), 8))
    finally:
        eng.close()


def test_the_stream_check_compares_every_layer_bit_for_bit(engine):
    request = engine._request(page(3))
    decoder = engine.schedulers[0].decoder
    check = prefill.check_stream(decoder, [request.inputs], None)
    assert check["identical"] and check["max_abs_diff"] == 0.0
    original = decoder.forward

    def nudged(pages, *, stream=None):  # one layer's keys off by a rounding step, on "the stream" only
        out = original(pages)
        if stream is not None:
            keys, values = out.layers[-1]
            out.layers[-1] = (keys + torch.finfo(keys.dtype).eps * keys.abs().max(), values)
        return out

    decoder.forward = nudged
    try:
        assert not prefill.check_stream(decoder, [request.inputs], object())["identical"]
    finally:
        del decoder.forward


class Occupancy:
    """Records, for each forward, its pages and how many slots were busy as it began; `seen` is set when a
    forward of `watch` pages begins."""

    def __init__(self, loop, watch: int) -> None:
        self.loop, self.watch, self.log, self.seen = loop, watch, [], threading.Event()

    def __call__(self, decoder, pages) -> None:
        self.log.append((len(pages), sum(r is not None for r in self.loop.slots)))
        if len(pages) == self.watch:
            self.seen.set()


@pytest.fixture
def full(engine):
    """A two-slot scheduler whose slots hold two pages that decode until cancelled."""
    loop = Scheduler(Faulty(engine.model, slots=2, max_len=engine.max_len + 100_000), eos_ids=set(),
                     prefill_batch=2, concurrent=True).start()
    busy = [loop.submit(engine._request(page(0), max_new_tokens=100_000)) for _ in range(2)]
    until(lambda: all(r.first_token is not None for r in busy))
    yield loop, busy
    for request in busy:
        request.cancel()
    loop.stop()


def test_a_full_chunk_is_prefilled_ahead_and_each_freed_slot_takes_a_page_at_once(engine, full):
    loop, (first, second) = full
    watch = loop.decoder.prefill_fault = Occupancy(loop, watch=2)
    queued = [loop.submit(engine._request(page(0), max_new_tokens=12)) for _ in range(2)]
    assert watch.seen.wait(60)
    assert watch.log == [(2, 2)], "the chunk was prefilled while every slot was busy"
    first.cancel()
    assert wait(queued[0]).error is None and wait(queued[1]).error is None
    assert queued[0].first_token >= first.finished, "seated in the slot the first page left"
    assert queued[1].first_token >= queued[0].finished, "then in the slot the next page left"
    assert not second.done.is_set(), "while the other page still decodes"
    assert [r.tokens for r in queued] == [reference(engine, page(0), 12)] * 2
    assert watch.log == [(2, 2)], "no other prefill: both pages came from the one ahead"


def test_a_prefilled_page_waiting_for_a_slot_leaves_at_once_when_its_job_is_cancelled(engine, full):
    """The first of the chunk leaves; the second, a page of the same size that decodes other tokens, then
    decodes its own, not the first's: its keys and values are still found by its row in the chunk."""
    loop, busy = full
    watch = loop.decoder.prefill_fault = Occupancy(loop, watch=2)
    black = Image.new("RGB", page(0).size, "black")
    queued = [loop.submit(engine._request(image, max_new_tokens=12)) for image in (page(0), black)]
    assert queued[0].length == queued[1].length
    assert watch.seen.wait(60)
    queued[0].cancel()
    assert isinstance(wait(queued[0]).error, Cancelled) and queued[0].resolutions == 1
    assert not any(r.done.is_set() for r in busy), "every slot still busy"
    busy[0].cancel()
    assert wait(queued[1]).error is None and queued[1].tokens == reference(engine, black, 12)
    assert reference(engine, black, 12) != reference(engine, page(0), 12)


def test_the_batch_leaves_room_for_the_prefilled_pages_that_wait_for_slots(engine):
    """Up to a chunk less one of prefilled pages hold their keys and values while they wait for slots: the
    memory kept free beside the cache grows by that much where prefills run beside the steps."""
    from gnosis_ocr.worker.engines.decoder import StaticDecoder

    model, side = engine.model, 1280
    extra = engine._reserve(model, side, 4, True) - engine._reserve(model, side, 4, False)
    assert extra == 3 * StaticDecoder.slot_bytes(model, engine._prompt_tokens(side)) > 0


def test_a_batch_smaller_than_a_chunk_serves_every_page(engine):
    """Three pages of one length wait for a two-slot batch that prefills four at a time: the chunk of three
    is prefilled though two slots are all there are, and the third page takes the first slot that frees."""
    loop = Scheduler(Faulty(engine.model, slots=2, max_len=engine.max_len), eos_ids=set(), prefill_batch=4,
                     concurrent=True)
    requests = [loop.submit(engine._request(page(0), max_new_tokens=8 * (i + 1))) for i in range(3)]
    loop.start()
    try:
        for i, request in enumerate(requests):
            assert wait(request).error is None and request.tokens == reference(engine, page(0), 8 * (i + 1))
    finally:
        loop.stop()
