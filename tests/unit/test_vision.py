"""The vision tower's attention in one call per layer: the same image features as transformers' own
per-window path, on ragged windows and on batches of pages of different sizes, and the same tokens."""

from __future__ import annotations

import pytest
import torch

from gnosis_ocr.worker.engines.vision import batch_window_attention, restore_window_attention

# Page grids in patches (t, h, w), even sides as the 2x2 merger needs: windows of 8x8 patches with
# ragged ones at the right and bottom edges, and a batch of three pages of different sizes.
GRIDS = [[(1, 22, 34)], [(1, 8, 8)], [(1, 30, 14), (1, 6, 10), (1, 16, 16)]]


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    yield m
    restore_window_attention(m)


def features(model, grids, seed: int = 0):
    visual = model.model.visual
    cfg = visual.config
    per_patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, per_patch, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        out = visual(pixels, grid_thw=torch.tensor(grids))
    return getattr(out, "pooler_output", None) if not torch.is_tensor(out) else out


@pytest.mark.parametrize("grids", GRIDS, ids=["ragged", "one-window", "three-pages"])
def test_one_call_per_layer_gives_the_librarys_image_features(model, grids):
    restore_window_attention(model)
    expected = features(model, grids)
    assert batch_window_attention(model) == len(model.model.visual.blocks)
    got = features(model, grids)
    restore_window_attention(model)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layers_without_padding_make_an_unmasked_call(model, monkeypatch):
    """A mask rules out SDPA's flash kernel on a GPU. A single page's full-attention layers, and a page of
    whole windows, pad nothing and so pass none; ragged windows keep theirs. The features stay the
    library's (the test above)."""
    from gnosis_ocr.worker.engines import vision

    calls = []
    sdpa = vision.F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((tuple(q.shape[:1] + q.shape[2:3]), attn_mask is not None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(vision.F, "scaled_dot_product_attention", recording)
    batch_window_attention(model)
    try:
        features(model, [(1, 8, 8)])  # one whole window of 64 patches: no layer pads
        assert calls and not any(masked for _, masked in calls)
        calls.clear()
        features(model, GRIDS[0])  # 22x34 patches: edge windows are short, the one full-attention window is not
        assert {shape for shape, masked in calls if not masked} == {(1, 22 * 34)}
        assert any(masked for _, masked in calls)
    finally:
        restore_window_attention(model)


def noise_page():
    from PIL import Image

    return Image.effect_noise((300, 420), 60).convert("RGB")


def test_a_page_decodes_the_same_tokens_either_way(model, tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model))
    from gnosis_ocr.worker.engines.prompt import PagePrompt

    prompt = PagePrompt(processor)
    image = noise_page()

    def tokens():
        inputs = prompt.reference(image)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    restore_window_attention(model)
    expected = tokens()
    batch_window_attention(model)
    try:
        assert tokens() == expected
    finally:
        restore_window_attention(model)


def test_an_engine_whose_batched_path_disagrees_falls_back_to_the_librarys(tiny_model, monkeypatch):
    """A kernel that computes something else (here: attention over nothing) must cost speed, not pages:
    the start-up check sees the features differ and the engine decodes on the library's path."""
    from gnosis_ocr.worker.engines import vision
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    def attends_to_nothing(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        return self.proj(torch.zeros_like(hidden_states))

    monkeypatch.setattr(vision, "_batched_forward", attends_to_nothing)
    engine = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=8,
                            batch_size=2, repetition_window=0)
    try:
        assert [c["batched"] for c in engine.vision_checks] == [False]
        assert "forward" not in engine.model.model.visual.blocks[0].attn.__dict__  # the library's own method
    finally:
        engine.close()
    monkeypatch.undo()
    engine = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=8,
                            batch_size=2, repetition_window=0)
    try:
        assert [c["batched"] for c in engine.vision_checks] == [True]
    finally:
        engine.close()


def test_a_batched_path_that_raises_leaves_the_librarys(model, monkeypatch):
    from gnosis_ocr.worker.engines import vision

    def raising(self, *args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(vision, "_batched_forward", raising)
    grids = GRIDS[0]
    restore_window_attention(model)
    expected = features(model, grids)
    visual = model.model.visual
    per_patch = visual.config.in_channels * visual.config.temporal_patch_size * visual.config.patch_size ** 2
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), per_patch)
    check = vision.check_against_library(model, pixels, torch.tensor(grids)) if batch_window_attention(model) else None
    assert check == {"batched": False, "reason": "RuntimeError: no kernel image is available for execution on the "
                                                 "device"}
    assert torch.equal(features(model, grids), expected)


@pytest.mark.parametrize("grids", GRIDS, ids=["ragged", "one-window", "three-pages"])
def test_the_varlen_kernel_gives_the_librarys_image_features(model, grids, monkeypatch):
    """On a GPU the windows can go to FlashAttention's variable-length kernel as they lie; here a reference
    of its contract stands in for it (`harness/flashref.py`), so what is checked is the engine's call:
    the windows' offsets, the shapes, and the rows put back in order."""
    from gnosis_ocr.worker.engines import attention
    from harness import flashref

    monkeypatch.setattr(attention, "varlen", flashref.varlen)
    restore_window_attention(model)
    expected = features(model, grids)
    assert batch_window_attention(model, varlen=True) == len(model.model.visual.blocks)
    try:
        got = features(model, grids)
    finally:
        restore_window_attention(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["agrees", "reads the wrong head", "none here"])
def test_the_engine_takes_the_varlen_kernel_only_where_it_runs_and_agrees(tiny_model, monkeypatch, kernel):
    """Where the kernel runs and matches the library's features, the vision tower uses it; where it runs
    and does not (here: each query head reading the next head's keys), the padded SDPA call serves, and
    the refusal is reported; where it cannot run (a CPU), the padded call too."""
    from gnosis_ocr.worker.engines import attention
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine
    from harness import flashref

    if kernel != "none here":
        monkeypatch.setattr(attention, "unavailable", lambda *args: None)
        def wrong(q, k, v, *args):
            return flashref.varlen(q, k, v, *args, head_map=lambda h: (h + 1) % q.shape[1])

        monkeypatch.setattr(attention, "varlen", flashref.varlen if kernel == "agrees" else wrong)
    engine = NanonetsEngine(tiny_model, model_id="test/tiny", revision="0" * 40, devices=["cpu"], max_new_tokens=8,
                            batch_size=2, repetition_window=0, decode_attention="sdpa")
    try:
        [check] = engine.vision_checks
        path = engine.attention_paths["cpu"]["vision_attention"]
        if kernel == "agrees":
            assert check["varlen"] and check["batched"] and path == "varlen"
        elif kernel == "reads the wrong head":
            assert not check["varlen"] and check["batched"] and path == "batched"
            assert not check["varlen_check"]["batched"] and check["varlen_check"]["relative_error"] > 1e-2
        else:
            assert not check["varlen"] and path == "batched"
            assert check["varlen_unavailable"] == "no FlashAttention kernel on cpu"
        assert engine.recognize(noise_page()).tokens > 0
    finally:
        engine.close()
