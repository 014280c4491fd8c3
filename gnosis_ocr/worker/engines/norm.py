"""The decoder's RMSNorm in a decode step: one fused kernel where the device has one, else the library's
arithmetic in one kernel fewer.

Qwen2.5-VL's RMSNorm runs 8 kernels: a cast to float32, `pow`, `mean`, an `add`, `rsqrt`, a `mul`, the
cast back and the weight's `mul`. A decode step runs 73 of them (two a layer and the final one), and a
CUDA graph replays its kernels one after the other, a few µs each whatever their size: at small batches
their number sets the step time (`bench/kernel_count.py`). Two ways to fewer, the first that holds on the
device is used:
- `fused`: torch's own fused RMSNorm kernel (`F.rms_norm`, one kernel on CUDA), as vLLM and SGLang run
  theirs. It multiplies by the weight in float32 and rounds once where the library rounds the normalised
  value first, so in bf16 the two differ by rounding; kept only where the device has the kernel and its
  output agrees with the module's to rounding (`rounding.py`), as the decode attention and the stacked
  projections are. In float32 the two are the same bit for bit.
- `exact`: the library's arithmetic with the float32 product written straight into a tensor of the
  input's dtype (on CUDA one kernel computes it in float32 and rounds it on the way out, which is what the
  library's `mul` then `.to()` do in two): the same values bit for bit, checked on the device.
Otherwise the module's own call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .rounding import relative_error, tolerance

log = logging.getLogger(__name__)

Norm = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


class Choice(NamedTuple):
    """The step's norm on a device: the function, its path (`fused`, `exact` or `module`) and why."""

    norm: Norm
    path: str
    reason: str


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` as the library computes it, its float32 product rounded into `x`'s dtype in one kernel."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    out = torch.empty_like(x)
    torch.mul(xf, torch.rsqrt(variance + norm.variance_epsilon), out=out)
    return norm.weight * out


def fused(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` through torch's fused RMSNorm: the same to rounding, one kernel where the device has it."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def module(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def has_fused_kernel(device: torch.device) -> bool:
    """Whether `F.rms_norm` on this device runs torch's fused kernel (`aten::_fused_rms_norm`, on CUDA), as
    seen by watching which operators one call dispatches to; elsewhere it is the library's kernels or
    more, and `exact` is one fewer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    try:
        # Outside inference mode: inside it the call reaches the watch whole, before it picks its kernel.
        with torch.inference_mode(False), Watch() as watch:
            F.rms_norm(torch.ones(1, 8, device=device), (8,), None, 1e-6)
    except Exception:  # no such device or operator here: no fused kernel
        return False
    return "_fused_rms_norm" in watch.ops


def for_model(norm: torch.nn.Module, width: int, device: torch.device, dtype: torch.dtype) -> Choice:
    """The step's norm for this device: `fused`, `exact` or the module's own call (a release whose norm
    computes anything else, or has no `variance_epsilon`, keeps its own)."""
    if not hasattr(norm, "variance_epsilon"):
        return Choice(module, "module", "the norm has no variance_epsilon")
    x = _hidden(width, device, dtype)
    with torch.inference_mode():
        own = norm(x)
        if has_fused_kernel(device):
            try:
                error = relative_error(fused(norm, x), own)
            except Exception as exc:  # a kernel that cannot run here costs speed, never the worker
                log.warning("fused RMSNorm failed on %s (%s: %s)", device, type(exc).__name__, exc)
            else:
                if error <= tolerance(dtype):
                    return Choice(fused, "fused", f"relative error {error:.1e}")
                log.warning("fused RMSNorm differs from the model's on %s (relative error %.2e)", device, error)
        try:
            if torch.equal(rms_norm(norm, x), own):
                return Choice(rms_norm, "exact", "bit for bit")
        except Exception:
            pass
    return Choice(module, "module", "neither the fused kernel nor the exact arithmetic matches it here")


def _hidden(width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states of a decode step, of the magnitudes a residual stream reaches."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(8, 1, width, generator=generator) * torch.logspace(-2, 2, 8)[:, None, None]).to(device, dtype)
