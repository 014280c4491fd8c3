"""The decode step's RMSNorm (`engines/norm.py`): torch's fused kernel where a device has one and it agrees
with the model's norm to rounding; else the library's values bit for bit, one kernel fewer."""

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
    # The CPU has no fused kernel: the exact arithmetic is chosen.
    assert norm.for_model(module, 2048, torch.device("cpu"), dtype)[:2] == (norm.rms_norm, "exact")


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
    step_norm, path, _ = norm.for_model(module, 256, torch.device("cpu"), torch.bfloat16)
    assert step_norm is norm.module and path == "module"
    x = torch.randn(4, 1, 256).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(step_norm(module, x), module(x))


def model_norm(width: int, dtype: torch.dtype) -> Qwen2_5_VLRMSNorm:
    torch.manual_seed(0)
    module = Qwen2_5_VLRMSNorm(width, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.rand(width) * 2)
    return module.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_device_with_a_fused_kernel_runs_it_where_it_agrees_to_rounding(dtype, monkeypatch):
    """As on CUDA: one kernel for each of a step's 73 norms. In float32 it is the library's bit for bit;
    in bf16 it rounds once where the library rounds twice."""
    monkeypatch.setattr(norm, "has_fused_kernel", lambda device: True)
    module = model_norm(2048, dtype)
    step_norm, path, reason = norm.for_model(module, 2048, torch.device("cpu"), dtype)
    assert step_norm is norm.fused and path == "fused", reason
    x = (torch.randn(16, 1, 2048) * 30).to(dtype)
    with torch.inference_mode():
        got, own = step_norm(module, x), module(x)
    if dtype == torch.float32:
        assert torch.equal(got, own)
    else:
        assert not torch.equal(got, own)  # another rounding, not another computation:
        torch.testing.assert_close(got, own, rtol=2 ** -7, atol=0)  # within one bf16 step everywhere


def test_a_fused_kernel_that_computes_otherwise_is_refused(monkeypatch, caplog):
    """A kernel that ignored the weight, say: far from the model's norm, so the exact arithmetic is used."""
    monkeypatch.setattr(norm, "has_fused_kernel", lambda device: True)
    monkeypatch.setattr(norm, "fused", lambda module, x: torch.nn.functional.rms_norm(x, (x.shape[-1],), None, 1e-6))
    module = model_norm(256, torch.bfloat16)
    assert norm.for_model(module, 256, torch.device("cpu"), torch.bfloat16)[:2] == (norm.rms_norm, "exact")
    assert "fused RMSNorm differs" in caplog.text


def test_a_fused_kernel_that_raises_is_refused(monkeypatch):
    def broken(module, x):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(norm, "has_fused_kernel", lambda device: True)
    monkeypatch.setattr(norm, "fused", broken)
    module = model_norm(256, torch.bfloat16)
    assert norm.for_model(module, 256, torch.device("cpu"), torch.bfloat16)[:2] == (norm.rms_norm, "exact")



def test_the_fused_kernel_is_found_on_cuda_and_not_on_the_cpu():
    """Which operators `F.rms_norm` reaches on each device, asked of this torch without a GPU: a CUDA tensor
    that holds no memory (a fake one) dispatches as a real one would."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not norm.has_fused_kernel(torch.device("cpu"))
    with FakeTensorMode():
        assert norm.has_fused_kernel(torch.device("cuda"))
