"""The decoder's RMSNorm in a decode step, one kernel fewer than the library's and bit for bit the same.

Qwen2.5-VL's RMSNorm runs 8 kernels: a cast to float32, `pow`, `mean`, an `add`, `rsqrt`, a `mul`, the
cast back and the weight's `mul`. A decode step runs 73 of them (two a layer and the final one), and a
CUDA graph replays its kernels one after the other, a few µs each whatever their size: at small batches
their number sets the step time (`bench/kernel_count.py`). Here the float32 product is written straight
into a tensor of the input's dtype: on CUDA one kernel computes it in float32 and rounds it on the way
out, which is what the library's `mul` then `.to()` do in two, so the values are the same bit for bit.
Used only where that holds for the model's own module on the device (`matches`); otherwise the module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` as the library computes it, its float32 product rounded into `x`'s dtype in one kernel."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    out = torch.empty_like(x)
    torch.mul(xf, torch.rsqrt(variance + norm.variance_epsilon), out=out)
    return norm.weight * out


def for_model(norm: torch.nn.Module, width: int, device: torch.device, dtype: torch.dtype
              ) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """`rms_norm` where it equals `norm`'s own forward on this device, bit for bit (a release whose norm
    computes anything else, or has no `variance_epsilon`, keeps its own); else the module's call."""
    if matches(norm, width, device, dtype):
        return rms_norm
    return lambda module, x: module(x)


def matches(norm: torch.nn.Module, width: int, device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(norm, "variance_epsilon"):
        return False
    generator = torch.Generator().manual_seed(0)
    # Hidden states of a decode step, of the magnitudes a residual stream reaches.
    x = (torch.randn(8, 1, width, generator=generator) * torch.logspace(-2, 2, 8)[:, None, None]).to(device, dtype)
    with torch.inference_mode():
        try:
            return bool(torch.equal(rms_norm(norm, x), norm(x)))
        except Exception:
            return False
