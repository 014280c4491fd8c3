"""The vision tower's patch embedding as one GEMM (`engines/patch_embed.py`): the Conv3d's own values to
rounding, and kept only where the device agrees."""

from __future__ import annotations

import pytest
import torch

from gnosis_ocr.worker.engines import patch_embed


@pytest.fixture
def model(tiny_model):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    yield m
    patch_embed.restore(m)


def pixels(model, patches: int = 300) -> torch.Tensor:
    proj = model.model.visual.patch_embed.proj
    return torch.randn(patches, proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))


def embed(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.model.visual.patch_embed(x)


def test_the_gemm_gives_the_convolutions_embeddings_and_is_kept(model):
    x = pixels(model)
    expected = embed(model, x)
    check = patch_embed.check(model, x)
    assert check["linear"] and check["relative_error"] < 1e-6
    assert "forward" in model.model.visual.patch_embed.__dict__  # the GEMM is what runs now
    torch.testing.assert_close(embed(model, x), expected, rtol=1e-4, atol=1e-5)


def test_a_gemm_that_disagrees_is_refused_and_the_convolution_stays(model, monkeypatch):
    x = pixels(model)
    expected = embed(model, x)
    switch = patch_embed.use_linear

    def wrong_patch_order(m) -> bool:  # flattens each patch in another order than the weight's
        if not switch(m):
            return False
        module = m.model.visual.patch_embed
        linear = module.forward
        module.forward = lambda h: linear(h.reshape(h.shape[0], -1).flip(-1))
        return True
    monkeypatch.setattr(patch_embed, "use_linear", wrong_patch_order)
    check = patch_embed.check(model, x)
    assert not check["linear"] and check["relative_error"] > 0.1
    assert "forward" not in model.model.visual.patch_embed.__dict__
    assert torch.equal(embed(model, x), expected)


def test_a_gemm_that_raises_is_refused_and_the_convolution_stays(model, monkeypatch):
    x = pixels(model)
    switch = patch_embed.use_linear

    def raising(m) -> bool:
        switch(m)
        m.model.visual.patch_embed.forward = lambda h: (_ for _ in ()).throw(RuntimeError("no kernel image"))
        return True
    monkeypatch.setattr(patch_embed, "use_linear", raising)
    assert patch_embed.check(model, x) == {"linear": False, "reason": "RuntimeError: no kernel image"}
    assert "forward" not in model.model.visual.patch_embed.__dict__


def test_an_overlapping_convolution_is_left_alone(model):
    proj = model.model.visual.patch_embed.proj
    proj.stride = (1, 1, 1)
    try:
        assert patch_embed.check(model, pixels(model)) == {"linear": False, "reason": "not a non-overlapping Conv3d"}
        assert "forward" not in model.model.visual.patch_embed.__dict__
    finally:
        proj.stride = proj.kernel_size
