"""An engine death costs the pages beside the one that caused it nothing, on the tiny Qwen2.5-VL on the CPU.

Which pages were on the device when it died is known, not which of them caused it: those are charged with
the death (`EngineDead.on_device`), those that waited or sat on another device are not. Charged pages come
back as suspects: each shares a device with few other suspects, and after two deaths runs alone
(`engines/admission.py`; the worker's side is in `tests/integration/test_batched_worker.py`)."""

from __future__ import annotations

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
