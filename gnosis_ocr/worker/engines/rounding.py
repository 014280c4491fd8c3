"""How close a faster path must come to the library's own on a device to be kept: to rounding.

The start-up checks of the decode attention, the vision tower's attention and its patch embedding each run
both paths on the same inputs and keep the faster one only if its output is the library's to rounding."""

from __future__ import annotations

import torch


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖, in float32."""
    expected = expected.float()
    return float((got.float() - expected).norm() / expected.norm().clamp(min=1e-12))


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative error that is rounding: float32's, or a half precision's (bf16, fp16)."""
    return 1e-4 if dtype == torch.float32 else 2e-2
