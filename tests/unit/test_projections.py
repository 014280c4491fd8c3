"""A decode step's q/k/v and gate/up as one GEMM each (`engines/projections.py`): the same values, no more
memory, fewer kernels, and refused where they would not be the modules' own."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForImageTextToText

from gnosis_ocr.worker.engines import projections
from gnosis_ocr.worker.engines.decoder import StaticDecoder

CPU = torch.device("cpu")


@pytest.fixture
def model(tiny_model):
    return AutoModelForImageTextToText.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


def own_logits(model) -> torch.Tensor:
    ids = torch.arange(3, 40).view(1, -1)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def layers(model):
    return model.model.language_model.layers


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_stacking_keeps_the_models_own_forward_and_its_memory(model):
    before, size = own_logits(model), parameter_bytes(model)
    mlp = layers(model)[0].mlp
    old = [weakref.ref(p) for p in (layers(model)[0].self_attn.q_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight)]
    stacked, reason = projections.for_layers(layers(model), model.config.get_text_config().hidden_size, CPU,
                                             torch.float32)
    assert stacked is not None, reason
    # The modules now read their rows of the stack: the prefill (the model's own forward) is unchanged,
    # and nothing is held twice.
    assert torch.equal(own_logits(model), before)
    assert parameter_bytes(model) == size
    gc.collect()
    assert [ref() for ref in old] == [None] * 3, "the tensors the stacks replaced are still held"
    for layer, stack in zip(layers(model), stacked, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.data_ptr() == stack.qkv_weight.data_ptr()
        assert attn.v_proj.weight.untyped_storage().data_ptr() == stack.qkv_weight.untyped_storage().data_ptr()
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == stack.gate_up_weight.untyped_storage().data_ptr()
        x = torch.randn(5, 1, attn.q_proj.in_features)
        with torch.inference_mode():
            own = torch.cat((attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), dim=-1)
            assert torch.equal(stack.qkv(x), own)
            # The residual add done by the GEMM rounds once: the same to float32's rounding.
            residual = torch.randn(5, attn.q_proj.in_features)
            torch.testing.assert_close(stack.mlp_into(residual.clone(), mlp.down_proj, x[:, 0]),
                                       residual + mlp(x[:, 0]), rtol=1e-6, atol=1e-6)


def test_a_second_decoder_on_the_same_model_copies_nothing(model):
    first = StaticDecoder(model, slots=2, max_len=256)
    second = StaticDecoder(model, slots=2, max_len=256)
    assert first.stacked is not None and second.stacked is not None
    for a, b in zip(first.stacked, second.stacked, strict=True):
        assert a.qkv_weight.data_ptr() == b.qkv_weight.data_ptr()
        assert a.gate_up_weight.data_ptr() == b.gate_up_weight.data_ptr()


def test_a_step_makes_four_gemms_a_layer_instead_of_seven(model):
    """q/k/v one GEMM, o, gate/up one GEMM, down (o and down adding into the residual stream as they write);
    and the head once a step."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.linears = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.linears += func in (torch.nn.functional.linear, torch.Tensor.addmm_)
            return func(*args, **(kwargs or {}))

    decoder = StaticDecoder(model, slots=2, max_len=256)
    counted = {}
    for stacked in (decoder.stacked, None):
        decoder.stacked, count = stacked, Count()
        with count:
            decoder.step(2, 64)
        counted["stacked" if stacked else "apart"] = count.linears
    n = len(layers(model))
    assert counted == {"stacked": 4 * n + 1, "apart": 7 * n + 1}


def test_stacked_projections_that_disagree_are_refused(model, monkeypatch, caplog):
    monkeypatch.setattr(projections.Stacked, "qkv", lambda self, x: torch.nn.functional.linear(
        x, self.qkv_weight, self.qkv_bias) * 1.01)
    decoder = StaticDecoder(model, slots=2, max_len=256)
    assert decoder.stacked is None and "relative error" in decoder.stacked_reason
    assert "calls each projection" in caplog.text


def test_a_residual_add_done_by_a_gemm_that_disagrees_is_refused(model, monkeypatch):
    """A GEMM that overwrote its output instead of adding into it (beta 0): the residual stream lost."""
    monkeypatch.setattr(projections, "add_into", lambda x, linear, h: x.copy_(linear(h.reshape(x.shape[0], -1))))
    decoder = StaticDecoder(model, slots=2, max_len=256)
    assert decoder.stacked is None and "relative error" in decoder.stacked_reason


def test_stacked_projections_that_raise_are_refused(model, monkeypatch):
    def broken(self, x, down, h):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(projections.Stacked, "mlp_into", broken)
    decoder = StaticDecoder(model, slots=2, max_len=256)
    assert decoder.stacked is None and "no kernel for this shape" in decoder.stacked_reason
    decoder.step(2, 64)  # the step calls the modules instead


def test_projections_that_are_not_plain_linears_are_left_alone(model):
    class Quantized(torch.nn.Linear):
        """A release's (or a quantizer's) own linear: its weight is not what a GEMM should read."""

    attn = layers(model)[0].self_attn
    old = attn.k_proj
    attn.k_proj = Quantized(old.in_features, old.out_features, bias=old.bias is not None)
    stacked, reason = projections.for_layers(layers(model), model.config.get_text_config().hidden_size, CPU,
                                             torch.float32)
    assert stacked is None and "not plain linears" in reason
