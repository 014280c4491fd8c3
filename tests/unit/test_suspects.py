"""An engine death costs the pages beside the one that caused it nothing, on the tiny Qwen2.5-VL on the CPU.

Which pages were on the device when it died is known, not which of them caused it: those are charged with
the death (`EngineDead.on_device`), those that waited or sat on another device are not. Charged pages come
back as suspects: each shares a device with few other suspects, and after two deaths runs alone
(`engines/admission.py`; the worker's side is in `tests/integration/test_batched_worker.py`)."""

from __future__ import annotations

import threading
import time

import pytest

from gnosis_ocr.errors import EngineDead
from harness.stack import wait_until
from tests.unit.test_batching import page, reference
from tests.unit.test_engine_faults import engine, loop, queue_together, settle  # noqa: F401 (fixtures)


def test_only_the_pages_on_the_device_when_it_dies_are_charged_with_the_death(engine, loop):  # noqa: F811
    requests = queue_together(loop, [engine._request(page(i), max_new_tokens=2000) for i in range(6)])
    on_device: set[int] = set()

    def fault(decoder, batch):  # a sticky CUDA error: the probe after it fails too
        if loop.steps >= 3:
            on_device.update(id(r) for r in loop.slots if r is not None)
            on_device.update(id(r) for job in loop._jobs for r in job.pages)
            decoder.broken = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    loop.decoder.step_fault = fault
    settle(requests)
    assert all(isinstance(r.error, EngineDead) for r in requests), [r.error for r in requests]
    assert [r.error.on_device for r in requests] == [id(r) in on_device for r in requests]
    assert 0 < len(on_device) < len(requests), "some decoded (or were prefilled ahead), the rest waited"
    assert loop.deaths.one()


def test_the_pages_of_a_device_that_another_device_brought_down_are_not_charged(engine, loop):  # noqa: F811
    requests = [engine._request(page(i), max_new_tokens=2000) for i in range(4)]
    queue_together(loop, requests)
    wait_until(lambda: all(loop.slots), timeout=60, message="three pages decoding")
    loop.kill(EngineDead("CUDA error on cuda:1: an illegal memory access was encountered"))
    settle(requests)
    assert [(type(r.error).__name__, r.error.on_device) for r in requests] == [("EngineDeadWithoutPage", False)] * 4


def test_a_suspect_shares_its_device_with_no_more_suspects_than_its_share(engine, loop):  # noqa: F811
    """Three slots: a share of one suspect (ENGINE_SUSPECT_SHARE is 8); fresh pages fill the other slots."""
    requests = [engine._request(page(i), max_new_tokens=24) for i in range(6)]
    for request in requests[:4]:
        request.deaths = 1
    seated: list[list] = []
    loop.decoder.step_fault = lambda decoder, batch: seated.append([r for r in loop.slots if r is not None])
    settle(queue_together(loop, requests))
    assert max(sum(1 for r in step if r.deaths) for step in seated) == 1
    assert max(len(step) for step in seated) == 3, "fresh pages are seated beside a suspect"
    for i, request in enumerate(requests):
        assert request.error is None and request.tokens == reference(engine, page(i), 24), i


def test_a_page_on_the_device_at_two_deaths_runs_alone_once_the_device_is_empty(engine, loop):  # noqa: F811
    requests = [engine._request(page(i), max_new_tokens=24) for i in range(5)]
    alone = requests[1]
    alone.deaths = 2
    seated: list[list] = []
    loop.decoder.step_fault = lambda decoder, batch: seated.append([r for r in loop.slots if r is not None])
    loop.submit(requests[0])
    wait_until(lambda: any(requests[0] in step for step in seated), timeout=60, message="the first page to decode")
    settle(queue_together(loop, requests[1:]) and requests)
    with_it = [step for step in seated if alone in step]
    assert with_it and all(step == [alone] for step in with_it), "nothing shares the device with it"
    first = seated.index(with_it[0])
    assert any(requests[0] in step for step in seated[:first]), "the page on the device ran on first"
    assert all(any(r in step for step in seated[first + len(with_it):]) for r in requests[2:]), \
        "the pages queued behind it waited for it"
    for i, request in enumerate(requests):
        assert request.error is None and request.tokens == reference(engine, page(i), 24), i


def keep_finding_it_stuck(scheduler, requests: list, timeout: float = 30) -> None:
    """What the threads of pages past their deadline and grace do (`NanonetsEngine.recognize`): declare the
    engine stuck every quarter of a second until their pages are resolved."""
    deadline = time.monotonic() + timeout
    while not all(r.done.is_set() for r in requests):
        assert time.monotonic() < deadline, "the engine never ended"
        scheduler.stalled("a page waited past its deadline")
        requests[-1].done.wait(0.25)


def test_a_prefill_that_hangs_beside_the_steps_is_charged_alone(engine, loop):  # noqa: F811
    """A forward that never returns: beside the steps, the loop goes on stepping, so only the forward's pages
    are charged with the death; on the loop's own thread the loop hangs with it, and every page on the
    device is charged, since what the loop hangs in is not known from outside."""
    decoding = [engine._request(page(i), max_new_tokens=2000) for i in range(2)]
    hanging = [engine._request(page(i), max_new_tokens=24) for i in range(2, 4)]
    release = threading.Event()
    # Steps of a big batch's length (20 ms): the decoding pages, of a few hundred tokens at most here, are
    # still decoding when the engine is found stuck.
    loop.decoder.step_fault = lambda decoder, batch: time.sleep(0.02)
    try:
        settle_first = queue_together(loop, decoding)
        wait_until(lambda: all(r in loop.slots for r in settle_first), timeout=60, message="two pages decoding")
        in_forward: list = []

        def hang(decoder, pages):
            in_forward.extend(r for r in hanging if any(r.inputs is p for p in pages))
            release.wait(60)

        loop.decoder.prefill_fault = hang
        queue_together(loop, hanging)
        wait_until(lambda: in_forward, timeout=60, message="the forward to hang")
        steps = loop.steps
        if loop.concurrent:
            wait_until(lambda: loop.steps > steps + 2, timeout=60, message="steps beside the hanging forward")
        keep_finding_it_stuck(loop, decoding + hanging)
    finally:
        release.set()
    settle(decoding + hanging)
    assert all(isinstance(r.error, EngineDead) for r in decoding + hanging), [r.error for r in decoding + hanging]
    assert [r.error.on_device for r in hanging] == [r in in_forward for r in hanging], "a page that waited is not"
    assert [r.error.on_device for r in decoding] == [not loop.concurrent] * 2
    assert in_forward[0] is hanging[0]
    assert loop.deaths.one()


def test_a_page_whose_prefill_hangs_goes_back_charged_and_the_pages_decoding_beside_it_uncharged(tiny_model):
    """The page's own thread finds the engine stuck (`recognize`, past the page's deadline and grace), with
    prefills beside the steps: the page is charged with the death, the page that went on decoding is not."""
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    deaths: list[BaseException] = []
    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=200,
                         batch_size=2, prefill_batch=1, prefill_concurrent="on", repetition_window=0,
                         stall_grace=0.5, on_dead=deaths.append)
    scheduler = eng.schedulers[0]
    assert scheduler.concurrent
    decoder, release, outcome = scheduler.decoder, threading.Event(), {}
    step, forward = decoder.step, decoder.forward
    decoder.step = lambda *a: time.sleep(0.02) or step(*a)  # 200 steps of a big batch's length: 4 s

    def decode_page_zero() -> None:
        try:
            eng.recognize(page(0), deadline=time.monotonic() + 60)
        except EngineDead as exc:
            outcome[0] = exc

    beside = threading.Thread(target=decode_page_zero)
    try:
        beside.start()
        wait_until(lambda: any(scheduler.slots), timeout=60, message="page 0 decoding")
        decoder.forward = lambda pages, stream=None: release.wait(60) and forward(pages, stream=stream)
        with pytest.raises(EngineDead, match="stopped making progress") as hung:
            eng.recognize(page(1), deadline=time.monotonic() + 0.5)
        beside.join(30)
        assert hung.value.on_device, "the page in the forward that hangs is charged"
        assert type(outcome.get(0)).__name__ == "EngineDeadWithoutPage", outcome
        assert len(deaths) == 1
    finally:
        release.set()
        eng.close()
