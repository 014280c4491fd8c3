"""The decode step's RMSNorm (`engines/norm.py`): the library's values bit for bit, one kernel fewer."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from gnosis_ocr.worker.engines import norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_step_norm_is_the_librarys_bit_for_bit(dtype):
    torch.manual_seed(0)
    module = Qwen2_5_VLRMSNorm(2048, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.rand(2048) * 2)
    module = module.to(dtype)
    for scale in (1e-3, 1.0, 300.0):
        x = (torch.randn(64, 1, 2048) * scale).to(dtype)
        with torch.inference_mode():
            assert torch.equal(norm.rms_norm(module, x), module(x)), f"{dtype} at scale {scale}"
    assert norm.for_model(module, 2048, torch.device("cpu"), dtype) is norm.rms_norm


class OtherNorm(torch.nn.Module):
    """A release whose norm computes something else: fused, its weight applied in float32."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(width) * 2)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), 1e-6).to(x.dtype)


def test_a_norm_that_computes_otherwise_keeps_its_own_forward():
    module = OtherNorm(256).to(torch.bfloat16)
    step_norm = norm.for_model(module, 256, torch.device("cpu"), torch.bfloat16)
    assert step_norm is not norm.rms_norm
    x = torch.randn(4, 1, 256).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(step_norm(module, x), module(x))
