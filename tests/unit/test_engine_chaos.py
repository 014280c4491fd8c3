"""Many faults at once, drawn at random (seeded), on the tiny Qwen2.5-VL on the CPU, with prefills on the
loop's thread and beside the steps: pages of four prompt lengths, some poisoned (their forward always
fails), forwards out of memory, seats and decode steps failing now and then, jobs cancelled and deadlines
passing while their pages wait, are prefilled, wait for a slot or decode; and suspects of earlier engine
deaths among them, some to run alone (`admission.py`).

The targeted tests (test_engine_faults.py, test_concurrent_prefill.py) each show one path. This one shows
that their paths compose: whatever happens in what order, every page is resolved exactly once, each fails
only for a fault that touched it, every page that succeeds has exactly the tokens it has alone (a seat
that read another page's row of a prefilled chunk, or put its keys in another's slot, shows here), the
engine stays alive, and it ends holding nothing."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from PIL import Image

from gnosis_ocr import defaults
from gnosis_ocr.errors import EngineDead, PageTimeout
from gnosis_ocr.worker.engines import Cancelled
from gnosis_ocr.worker.engines.scheduler import Scheduler
from harness.stack import wait_until
from tests.unit.test_batching import page
from tests.unit.test_engine_faults import Deaths, Faulty

TOKENS = 40


def pool() -> list[Image.Image]:
    """Pages of two sizes, three of each that decode different tokens (text, black, a gradient), and two
    pages of other sizes. Pages prefilled together (equal prompt lengths) are common and differ, so a page
    seated from another's row decodes other tokens."""
    pages = []
    for i in (0, 3):
        size = page(i).size
        pages += [page(i), Image.new("RGB", size, "black"), Image.linear_gradient("L").resize(size).convert("RGB")]
    return pages + [page(1), page(4)]


class Poisoned(RuntimeError):
    """A page whose forward always fails (a corrupt image, say): it must fail alone."""


class SeatFault(RuntimeError):
    pass


class StepFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def engine(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"],
                         max_new_tokens=TOKENS, batch_size=3, prefill_batch=2, prefill_gather=0, repetition_window=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def alone(engine):
    """Each pool page's tokens decoded alone, by plain `generate`: what every page that succeeds must have
    (a shorter page has the first of them)."""
    eos = engine.model.generation_config.eos_token_id
    out = {}
    for i, image in enumerate(pool()):
        inputs = engine.processor(text=[engine.prompt], images=[image], return_tensors="pt")
        with torch.inference_mode():
            tokens = engine.model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
        tokens = tokens[0, inputs["input_ids"].shape[1]:].tolist()
        out[i] = tokens[:tokens.index(eos)] if eos in tokens else tokens
    return out


class Chaos:
    """The faults, drawn from `rng` as the engine calls the decoder (from the loop's thread and the prefill
    thread, hence the lock)."""

    def __init__(self, rng: random.Random, poisoned: set[int]) -> None:
        self.rng, self.poisoned, self.lock = rng, poisoned, threading.Lock()
        self.ooms = self.seat_faults = self.seated_in_faults = self.step_faults = self.chunks = 0
        self.oom_at = rng.choice([0, rng.randrange(4, 10)])  # the chunk's forward that runs out of memory, if any
        self.quiet_steps = 0  # no step fault for a while after one: a transient failure, not a broken page

    def forward(self, decoder, pages) -> None:
        if any(id(p["pixel_values"]) in self.poisoned for p in pages):
            raise Poisoned("this page cannot be prefilled")
        with self.lock:  # once, late: from then on chunks are smaller, and chunks are what the rest tests
            self.chunks += len(pages) > 1
            oom = len(pages) > 1 and self.chunks == self.oom_at
            self.ooms += oom
        if oom:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (chaos)")

    def seat(self, decoder, slots) -> None:
        with self.lock:
            fail = self.rng.random() < 0.12
            if fail:
                self.seat_faults += 1
                self.seated_in_faults += len(slots)
        if fail:
            raise SeatFault("the copy into the cache failed")

    def step(self, decoder, batch) -> None:
        with self.lock:
            if self.quiet_steps:
                self.quiet_steps -= 1
                return
            fail = self.rng.random() < 0.04
            if fail:
                self.step_faults += 1
                self.quiet_steps = 12
        if fail:
            raise StepFault("an illegal instruction, once")


def cancel_when(loop, request, steps: int | None, deadline: float) -> threading.Thread:
    """Cancel `request` once the loop has run `steps` decode steps, or (`steps` None) once the page is
    prefilled and waits for a slot (beside the steps, while every slot is busy), or at once if it is
    seated or done before either."""
    def moment() -> bool:
        if request.done.is_set() or request.first_token is not None:
            return True
        if steps is not None:
            return loop.steps >= steps
        return any(job.done and request in piece.pages for job in list(loop._jobs) for piece in list(job.pieces))

    def run() -> None:
        try:  # the loop's state has no event to wait on: polled, since the point is the moment
            wait_until(moment, timeout=max(0.0, deadline - time.monotonic()), interval=0.0005, message="the moment")
        finally:
            request.cancel()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def drawn_pages(engine, rng: random.Random) -> tuple[list, list[int], list]:
    """24 pages drawn from the pool, most of the first size (so that chunks of one length are common), each
    with a random output cap: the pool, each page's index in it, and their requests."""
    images = pool()
    sizes = [rng.choice([0, 1, 2] * 4 + [3, 4, 5, 6, 7]) for _ in range(24)]
    return images, sizes, [engine._request(images[i], max_new_tokens=rng.randint(3, TOKENS)) for i in sizes]


@pytest.mark.parametrize("concurrent", [False, True], ids=["serial", "concurrent"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_faults_cost_only_the_pages_they_touch(engine, alone, concurrent, seed):
    rng = random.Random(seed)
    images, sizes, requests = drawn_pages(engine, rng)
    fate = {id(r): "clean" for r in requests}
    for r in rng.sample(requests, 2):
        fate[id(r)] = "poisoned"
    clean = [r for r in requests if fate[id(r)] == "clean"]
    for r in rng.sample(clean, 4):
        fate[id(r)] = "cancelled"
    for r in rng.sample([r for r in requests if fate[id(r)] == "clean"], 3):
        fate[id(r)] = "deadline"
        r.deadline = time.monotonic() + rng.uniform(0, 0.3)
    chaos = Chaos(rng, {id(r.inputs["pixel_values"]) for r in requests if fate[id(r)] == "poisoned"})
    # Suspects of earlier engine deaths, drawn apart so that the faults above stay what each seed drew.
    suspects = random.Random(seed + 100)
    for r in requests:
        r.deaths = suspects.choice([0, 0, 0, 0, 1, 1, 2])
    seated: list[list] = []

    def step(d, batch) -> None:
        seated.append([r for r in loop.slots if r is not None])
        chaos.step(d, batch)

    decoder = Faulty(engine.model, slots=3, max_len=engine.max_len)
    decoder.prefill_fault, decoder.seat_fault, decoder.step_fault = chaos.forward, chaos.seat, step
    deaths: list[BaseException] = []
    eos = engine.model.generation_config.eos_token_id
    loop = Scheduler(decoder, eos_ids={eos}, prefill_batch=2, on_dead=deaths.append, concurrent=concurrent).start()
    try:
        give_up = time.monotonic() + 120
        cancellers = [cancel_when(loop, r, rng.choice([None, rng.randrange(0, 60)]), give_up)
                      for r in requests if fate[id(r)] == "cancelled"]
        for r in requests:
            loop.submit(r)
        for r in requests:
            assert r.done.wait(max(0.0, give_up - time.monotonic())), "a page was never resolved"
        for thread in cancellers:
            thread.join(10)

        assert [r.resolutions for r in requests] == [1] * len(requests), "each page resolved exactly once"
        assert not deaths and loop.alive, deaths
        outcomes = {}
        for r, i in zip(requests, sizes, strict=True):
            kind = fate[id(r)]
            outcomes.setdefault(kind, []).append(type(r.error).__name__ if r.error else "ok")
            if r.error is None:
                assert r.tokens == alone[i][:r.max_new_tokens], f"a {kind} page decoded other tokens than alone"
            elif isinstance(r.error, SeatFault):
                continue  # counted below: any page may sit in a seat that fails
            elif kind == "poisoned":
                assert isinstance(r.error, Poisoned), r.error
            elif kind == "cancelled":
                assert isinstance(r.error, Cancelled), r.error
            elif kind == "deadline":
                assert isinstance(r.error, PageTimeout), r.error
            else:
                pytest.fail(f"a page no fault touched failed: {type(r.error).__name__}: {r.error}")
        assert all(isinstance(r.error, Poisoned) for r in requests if fate[id(r)] == "poisoned"), outcomes
        assert sum(isinstance(r.error, SeatFault) for r in requests) == chaos.seated_in_faults, \
            "a failed seat fails the pages it was seating, and no others"
        assert not any(isinstance(r.error, StepFault) for r in requests), "a transient step failure costs no page"
        # The suspects' rules held at every step: one suspect at a time in 3 slots, and a page at two deaths alone.
        assert all(sum(1 for r in at if r.deaths) <= 1 for at in seated), "suspects shared the device"
        assert all(len(at) == 1 for at in seated if any(r.deaths >= defaults.ENGINE_DEATHS_ALONE for r in at))
        # Nothing held: no slot, no prefilled page, nothing waiting; and the engine serves the next page.
        assert loop.load() == 0 and not loop._jobs
        decoder.prefill_fault = decoder.seat_fault = decoder.step_fault = None
        after = loop.submit(engine._request(images[0], max_new_tokens=TOKENS))
        assert after.done.wait(60) and after.error is None and after.tokens == alone[0]
        assert chaos.seat_faults + chaos.step_faults + chaos.ooms > 0, "the seed drew no fault: pick another"
    finally:
        loop.stop()


@pytest.mark.parametrize("concurrent", [False, True], ids=["serial", "concurrent"])
@pytest.mark.parametrize("seed", [4, 5, 6])
def test_a_device_lost_at_a_random_moment_returns_every_page_it_held_once(engine, alone, concurrent, seed):
    """The device stops answering (a sticky CUDA error) at a random step, forward or seat, among the faults
    above: each page is resolved once, as done (with its own tokens), failed by a fault that touched it, or
    returned with EngineDead for another worker; the engine reports one death and holds nothing."""
    rng = random.Random(seed)
    images, sizes, requests = drawn_pages(engine, rng)
    for r in rng.sample(requests, 3):
        r.cancel()
    chaos = Chaos(rng, set())
    where, when = rng.choice(["step", "forward", "seat"]), rng.randrange(2, 12)
    calls = {"step": 0, "forward": 0, "seat": 0}
    decoder = Faulty(engine.model, slots=3, max_len=engine.max_len)

    def lost(phase: str, fault):
        def hook(d, arg) -> None:
            calls[phase] += 1
            if phase == where and calls[phase] >= when:
                d.broken = True
            if d.broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            fault(d, arg)
        return hook

    decoder.step_fault, decoder.prefill_fault, decoder.seat_fault = (
        lost("step", chaos.step), lost("forward", chaos.forward), lost("seat", chaos.seat))
    deaths = Deaths()
    eos = engine.model.generation_config.eos_token_id
    loop = Scheduler(decoder, eos_ids={eos}, prefill_batch=2, on_dead=deaths, concurrent=concurrent).start()
    try:
        for r in requests:
            loop.submit(r)
        for r in requests:
            assert r.done.wait(120), "a page was never resolved"
        assert [r.resolutions for r in requests] == [1] * len(requests), "each page resolved exactly once"
        assert deaths.one() and not loop.alive
        returned = [r for r in requests if isinstance(r.error, EngineDead)]
        assert returned, "the device was lost with pages in flight"
        for r, i in zip(requests, sizes, strict=True):
            if r.error is None:
                assert r.tokens == alone[i][:r.max_new_tokens]
            else:
                assert isinstance(r.error, (EngineDead, Cancelled, SeatFault)), r.error
        assert loop.load() == 0 and not loop._jobs
        with pytest.raises(EngineDead):
            loop.submit(engine._request(images[0]))
    finally:
        loop.stop()
