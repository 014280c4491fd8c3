"""The batched GPU engine's decode, on a tiny Qwen2.5-VL on the CPU: same tokens as `generate`, and
continuous batching that admits, stops and drops pages at step boundaries."""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch
from PIL import Image

from gnosis_ocr.errors import PageTimeout
from gnosis_ocr.worker.engines import Cancelled
from harness.docs import text_image

# Different sizes give prompts of different lengths: a ragged batch.
SIZES = [(1000, 400), (200, 90), (40, 40), (500, 500), (90, 300)]


def page(i: int) -> Image.Image:
    return Image.open(io.BytesIO(text_image([f"page {i} of the batch"], size=SIZES[i % len(SIZES)])))


@pytest.fixture(scope="module")
def engine(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    # Freed slots refilled at once (no gathering): these tests see when each page is seated.
    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=48,
                         batch_size=3, prefill_batch=2, prefill_gather=0, repetition_window=0)
    yield eng
    eng.close()


def reference(engine, image: Image.Image, max_new_tokens: int) -> list[int]:
    """Plain `generate` on the page alone: the tokens the fast path must reproduce."""
    model = engine.model
    inputs = engine.processor(text=[engine.prompt], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def submit(engine, image: Image.Image, *, max_new_tokens: int | None = None, deadline: float | None = None):
    request = engine._request(image, max_new_tokens=max_new_tokens)
    request.deadline = deadline
    return engine.schedulers[0].submit(request)


def wait(request, timeout: float = 60):
    assert request.done.wait(timeout), "the engine never answered"
    return request


def test_one_page_decodes_token_for_token_like_generate(engine):
    for i in range(3):
        request = wait(submit(engine, page(i)))
        assert request.error is None
        assert request.tokens == reference(engine, page(i), 48)


@pytest.mark.parametrize("attention_mode,stacked", [("sdpa", True), ("flash", True), ("sdpa", False)])
def test_each_decode_step_computes_the_models_own_hidden_state(engine, attention_mode, stacked, monkeypatch):
    """Tokens alone can agree by luck: a tiny random model's attention is nearly uniform, so an error in
    the rotary embedding of a decode step can leave every argmax as it was. Each step's final hidden
    state must be the model's own forward at that position, given the same tokens: for two pages
    prefilled together into slots 0 and 2, and a page of another length in slot 3, beside an empty slot.
    With either attention: `flash` calls, here, a reference of FlashAttention's contract, and runs as a GPU
    would, its RMSNorm through torch's fused one (here its float32 arithmetic, the library's bit for bit).
    And with the projections stacked (the default) or apart, as on a device where their check fails."""
    from gnosis_ocr.worker.engines import attention, norm, projections
    from gnosis_ocr.worker.engines.decoder import StaticDecoder
    from harness import flashref

    if attention_mode == "flash":
        monkeypatch.setattr(attention, "unavailable", lambda *args: None)
        monkeypatch.setattr(attention, "varlen", flashref.varlen)
        monkeypatch.setattr(norm, "has_fused_kernel", lambda device: True)
    if not stacked:
        monkeypatch.setattr(projections, "for_layers", lambda *args: (None, "apart for this test"))
    model, steps = engine.model, 12
    pages = {0: engine._request(page(0)).inputs, 2: engine._request(page(5)).inputs,
             3: engine._request(page(1)).inputs}
    assert pages[0]["input_ids"].shape == pages[2]["input_ids"].shape != pages[3]["input_ids"].shape
    decoder = StaticDecoder(model, slots=4, max_len=engine.max_len, attention_mode=attention_mode)
    assert decoder.attention == attention_mode
    assert decoder.rms_path == ("fused" if attention_mode == "flash" else "exact")
    tokens = dict(zip((0, 2), decoder.prefill([0, 2], [pages[0], pages[2]]), strict=True))
    tokens[3] = decoder.prefill([3], [pages[3]])[0]
    tokens = {slot: [first] for slot, first in tokens.items()}
    hidden: dict[int, list] = {slot: [] for slot in pages}
    for _ in range(steps):
        nxt = decoder.step(4, max(pages[s]["input_ids"].shape[1] + len(tokens[s]) for s in pages))
        for slot in pages:
            hidden[slot].append(decoder.hidden[slot].clone())
            tokens[slot].append(int(nxt[slot]))
    for slot, inputs in pages.items():
        torch.testing.assert_close(torch.stack(hidden[slot]), own_forward(model, inputs, tokens[slot][:steps]),
                                   rtol=1e-4, atol=1e-5, msg=lambda m, slot=slot: f"slot {slot}: {m}")


def own_forward(model, inputs: dict, tokens: list[int]) -> torch.Tensor:
    """The model's final hidden states at the positions of `tokens`, after the page's prompt."""
    prompt, n = inputs["input_ids"].shape[1], len(tokens)
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        full["mm_token_type_ids"] = torch.cat([types, torch.zeros((1, n), dtype=types.dtype)], dim=1)
    with torch.inference_mode():
        return model.model(**full).last_hidden_state[0, prompt:prompt + n]


def test_a_ragged_batch_decodes_each_page_as_if_alone(engine):
    lengths = {engine._request(page(i)).length for i in range(5)}
    assert len(lengths) >= 3, "the pages should make prompts of different lengths"
    requests = [submit(engine, page(i)) for i in range(5)]  # 5 pages, 3 slots: two wait for a free slot
    for i, request in enumerate(requests):
        wait(request)
        assert request.error is None
        assert request.tokens == reference(engine, page(i), 48), f"page {i} differs from generate"


def test_a_finished_page_frees_its_slot_for_a_waiting_one_at_once(engine):
    long = [submit(engine, page(i), max_new_tokens=48) for i in range(2)]
    short = submit(engine, page(2), max_new_tokens=2)
    waiting = submit(engine, page(3), max_new_tokens=2)  # no slot free until `short` ends
    for request in (*long, short, waiting):
        wait(request)
    assert waiting.admitted < min(r.finished for r in long), "the waiting page waited for the longest page"
    assert all(r.tokens == reference(engine, page(i), 48) for i, r in enumerate(long))
    assert short.truncated and short.stop_reason == "max_tokens" and len(short.tokens) == 2
    # Seated in `short`'s slot while the step after its end was already running: that step's token for the
    # slot is `short`'s, and must reach neither page.
    assert waiting.tokens == reference(engine, page(3), 2)


def test_a_page_over_its_time_limit_leaves_the_batch_alone(engine):
    others = [submit(engine, page(i)) for i in range(2)]
    late = submit(engine, page(4), deadline=time.monotonic() + 0.02)
    wait(late)
    assert isinstance(late.error, PageTimeout) and late.error.code == "timeout"
    assert isinstance(late.error, TimeoutError)
    for i, request in enumerate(others):
        assert wait(request).error is None and request.tokens == reference(engine, page(i), 48)


def test_a_cancelled_page_leaves_at_the_next_step(engine):
    keep = submit(engine, page(0))
    gone = submit(engine, page(1), max_new_tokens=10_000)
    # Cancel once it is decoding: it must stop at the next step, long before its token budget.
    deadline = time.monotonic() + 30
    while not gone.tokens and time.monotonic() < deadline:
        time.sleep(0.001)  # polling a flag another thread sets; no event to wait on
    gone.cancel()
    assert isinstance(wait(gone).error, Cancelled)
    assert len(gone.tokens) < 200
    assert wait(keep).error is None and keep.tokens == reference(engine, page(0), 48)


def recognize_from_threads(engine, pages: int, timeout: float = 60) -> dict:
    """`engine.recognize` of pages 0..pages-1, each from a thread of its own, all at once: their results."""
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = engine.recognize(page(i), deadline=time.monotonic() + timeout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(pages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 1.5)
    assert sorted(results) == list(range(pages))
    return results


def test_recognize_from_many_threads_returns_each_pages_text(engine):
    results = recognize_from_threads(engine, 6)
    for i, result in results.items():
        expected = engine.tokenizer.decode(reference(engine, page(i), 48), skip_special_tokens=True)
        assert result.text == expected and result.timings.queue_seconds >= 0 and result.timings.first_token_seconds > 0


def test_repetition_guard_stops_a_looping_page_and_marks_it_truncated(tiny_model):
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    # The tiny random model falls into a loop of a ~10-token unit within a few hundred tokens, as VLMs do on
    # tables; the guard waits for more repeats than a page has lines, then stops it well before the cap.
    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=4000,
                         batch_size=2, repetition_window=64)
    try:
        result = eng.recognize(page(0))
    finally:
        eng.close()
    assert result.truncated and result.stop_reason == "repetition"
    assert result.tokens < 3000, result.tokens


@pytest.mark.parametrize("prefills", ["serial", "concurrent"])
def test_one_engine_per_device_shares_the_pages(tiny_model, prefills):
    """Two engines on the CPU stand in for two GPUs: each gets its own model, cache and loop (and, with
    prefills beside the steps, its own prefill thread), and each page's text is the one it has alone."""
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    eng = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu", "cpu"],
                         max_new_tokens=32, batch_size=2, repetition_window=0,
                         prefill_concurrent="on" if prefills == "concurrent" else "off")
    try:
        assert len(eng.schedulers) == 2 and eng.slots == 4
        assert eng.models[0] is not eng.models[1]
        assert [s.concurrent for s in eng.schedulers] == [prefills == "concurrent"] * 2
        texts: dict[int, str] = {}

        def recognize(i: int) -> None:
            texts[i] = eng.recognize(page(i)).text

        threads = [threading.Thread(target=recognize, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(s.steps > 0 for s in eng.schedulers), [s.steps for s in eng.schedulers]
        assert texts == {i: eng.page_prompt.decode(reference(eng, page(i), 32)) for i in range(8)}
    finally:
        eng.close()


def test_page_inputs_built_from_the_image_grid_equal_the_processors(engine):
    assert engine.fast_prompt
    for i in range(len(SIZES)):
        ours, theirs = engine.page_prompt.inputs(page(i)), engine.page_prompt.reference(page(i))
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]) and ours[key].dtype == theirs[key].dtype, (i, key)


def test_a_burst_of_pages_is_prefilled_a_chunk_at_a_time_between_decode_steps(engine):
    """Running pages get a token between any two prefills: a burst never holds them up for more than one
    chunk (prefill_batch pages), and every page still decodes exactly as alone."""
    from gnosis_ocr.worker.engines.scheduler import Scheduler
    from tests.unit.test_engine_faults import Faulty

    events: list[str] = []
    decoder = Faulty(engine.model, slots=6, max_len=engine.max_len)
    decoder.prefill_fault = lambda d, pages: events.append(f"prefill {len(pages)}")
    decoder.step_fault = lambda d, batch: events.append("step")
    scheduler = Scheduler(decoder, eos_ids=set(), prefill_batch=2)
    image = page(0)
    requests = [scheduler.submit(engine._request(image, max_new_tokens=12)) for _ in range(6)]
    scheduler.start()
    try:
        for request in requests:
            wait(request)
    finally:
        scheduler.stop()
    prefills = [i for i, e in enumerate(events) if e.startswith("prefill")]
    assert [events[i] for i in prefills] == ["prefill 2"] * 3, events
    assert all("step" in events[a:b] for a, b in zip(prefills, prefills[1:])), events
    expected = reference(engine, image, 12)
    assert all(r.error is None and r.tokens == expected for r in requests)


def gathering(engine, *, gather: float, tokens: list[int], waiting: int, max_len: int | None = None):
    """A scheduler with `len(tokens)` slots full of pages of those output lengths and `waiting` more pages
    of 4 tokens queued behind them; the sizes of its prefills in order, and the requests."""
    from gnosis_ocr.worker.engines.scheduler import Scheduler
    from tests.unit.test_engine_faults import Faulty

    sizes: list[int] = []
    decoder = Faulty(engine.model, slots=len(tokens), max_len=max_len or engine.max_len)
    decoder.prefill_fault = lambda d, pages: sizes.append(len(pages))
    scheduler = Scheduler(decoder, eos_ids=set(), prefill_batch=2, gather=gather)
    image = page(0)
    seated = [scheduler.submit(engine._request(image, max_new_tokens=n)) for n in tokens]
    queued = [scheduler.submit(engine._request(image, max_new_tokens=4)) for _ in range(waiting)]
    scheduler.start()
    try:
        for request in (*seated, *queued):
            assert wait(request).error is None
    finally:
        scheduler.stop()
    expected = reference(engine, image, 48)
    for r in (*seated, *queued):  # as far as `generate` goes: the scheduler here stops at no EOS
        n = min(len(r.tokens), len(expected))
        assert r.tokens[:n] == expected[:n]
    return sizes, seated, queued


@pytest.mark.parametrize("gather", [0.0, 60.0])
def test_slots_that_free_one_at_a_time_are_refilled_a_chunk_at_a_time(engine, gather):
    """Pages end one at a time; with pages queueing for slots, a freed slot waits for a second one and
    both are prefilled together, instead of one prefill per page (each costs the host about the same)."""
    sizes, _, _ = gathering(engine, gather=gather, tokens=[6, 12] + [40] * 6, waiting=2)
    # The first eight pages in chunks of two; then the two queued ones, as their slots free.
    assert sizes == ([2, 2, 2, 2, 2] if gather else [2, 2, 2, 2, 1, 1]), sizes


def test_a_small_batch_refills_each_slot_at_once(engine):
    """Gathering would leave a large share of a small batch empty (a CPU's 4 slots): never there."""
    sizes, _, _ = gathering(engine, gather=60.0, tokens=[6, 12, 40, 40], waiting=2)
    assert sizes == [2, 2, 1, 1], sizes


def test_a_gathering_slot_waits_no_longer_than_its_limit(engine):
    """One slot frees and no other will for a long time: the queued page is seated once the limit has
    passed, not when the long pages end."""
    gather = 0.2
    sizes, seated, queued = gathering(engine, gather=gather, tokens=[4] + [600] * 7, waiting=2,
                                      max_len=engine.max_len + 600)
    first = queued[0]
    assert first.admitted - seated[0].finished >= gather, "the freed slot did not wait for a second one"
    assert first.finished < min(r.finished for r in seated[1:]), "it waited for the long pages"
    # Then the last queued page takes the slot the first leaves at once: a seat for every waiting page.
    assert sizes == [2, 2, 2, 2, 1, 1], sizes


def test_nothing_waits_when_every_queued_page_has_a_slot(engine):
    """No gathering when it buys nothing: one page queued, one slot free."""
    sizes, seated, queued = gathering(engine, gather=60.0, tokens=[4] + [600] * 7, waiting=1,
                                      max_len=engine.max_len + 600)
    assert queued[0].finished < min(r.finished for r in seated[1:])
    assert sizes == [2, 2, 2, 2, 1], sizes


def test_a_page_held_for_a_chunk_can_still_be_cancelled_at_once(engine):
    """A queued page held while a chunk gathers leaves at once when its job is cancelled; the page behind
    it then has a seat of its own and is seated without waiting for the gathering limit."""
    from gnosis_ocr.worker.engines.scheduler import Scheduler
    from tests.unit.test_engine_faults import Faulty

    decoder = Faulty(engine.model, slots=8, max_len=engine.max_len + 600)
    scheduler = Scheduler(decoder, eos_ids=set(), prefill_batch=2, gather=600.0)
    image = page(0)
    seated = [scheduler.submit(engine._request(image, max_new_tokens=n)) for n in [4] + [600] * 7]
    held, behind = (scheduler.submit(engine._request(image, max_new_tokens=4)) for _ in range(2))
    scheduler.start()
    try:
        wait(seated[0])
        deadline = time.monotonic() + 30
        while held not in scheduler._limbo and time.monotonic() < deadline:
            time.sleep(0.001)  # polling the loop's state; no event to wait on
        assert held in scheduler._limbo and held.admitted is None, "the freed slot should be gathering"
        held.cancel()
        assert isinstance(wait(held).error, Cancelled)
        assert wait(behind).error is None
        assert behind.finished < min(r.finished or float("inf") for r in seated[1:]), "it waited for the long pages"
    finally:
        scheduler.stop()
