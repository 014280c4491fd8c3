"""Qwen2.5-VL's patch embedding as the one matrix product it is, instead of a 3-D convolution.

The vision tower embeds each 2×14×14×3 patch with a `Conv3d` whose stride equals its kernel: the
windows do not overlap and the output is 1×1×1 per patch, a plain projection of each flattened patch.
cuDNN has no fast algorithm for that degenerate shape on some cards and releases: torch 2.9 fell back to
`slow_conv_dilated3d` (Qwen-VL vision 10-20 times slower, pytorch/pytorch#174051), and an H100 in bf16
was seen taking seconds per call (sglang-omni#539); vLLM, SGLang and transformers' own opt-in fusion
(`fusion_mapping.py`) all make it a GEMM. Here the module's own weight is viewed as a matrix (no copy),
and the GEMM is kept only where it matches the convolution on the device to rounding.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .rounding import relative_error, tolerance

log = logging.getLogger(__name__)


def _embed(model):
    return getattr(getattr(getattr(model, "model", model), "visual", None), "patch_embed", None)


def use_linear(model) -> bool:
    """Switch the patch embedding to the GEMM. False, and the library's path stays, where the module is
    not a non-overlapping `Conv3d` projection."""
    embed = _embed(model)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or not hasattr(embed, "embed_dim"):
        return False
    if (proj.stride != proj.kernel_size or proj.padding != (0, 0, 0) or proj.dilation != (1, 1, 1)
            or proj.groups != 1):
        return False

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = proj.weight
        patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(patches, weight.view(weight.shape[0], -1), proj.bias).view(-1, embed.embed_dim)

    embed.forward = forward
    return True


def restore(model) -> None:
    """Back to the library's `Conv3d`."""
    embed = _embed(model)
    if embed is not None and "forward" in embed.__dict__:
        del embed.forward


def check(model, pixel_values: torch.Tensor) -> dict:
    """One page's patch embeddings both ways on this device. The GEMM stays only if it matches the
    convolution to rounding (relative error under `tolerance` for the dtype)."""
    if not use_linear(model):
        return {"linear": False, "reason": "not a non-overlapping Conv3d"}
    embed = _embed(model)
    weight = embed.proj.weight
    pixels = pixel_values.to(weight.device, weight.dtype)
    with torch.inference_mode():
        try:
            got = embed(pixels).float()
        except Exception as exc:  # a GEMM that cannot run here costs speed, never the worker
            restore(model)
            log.warning("patch embedding as a GEMM failed on %s (%s: %s); keeping the Conv3d", weight.device,
                        type(exc).__name__, exc)
            return {"linear": False, "reason": f"{type(exc).__name__}: {exc}"}
        restore(model)
        expected = embed(pixels).float()
    error, limit = relative_error(got, expected), tolerance(weight.dtype)
    ok = error <= limit
    if ok:
        use_linear(model)
    else:
        log.warning("patch embedding as a GEMM differs from the Conv3d on %s (relative error %.2e > %.0e); "
                    "keeping the Conv3d", weight.device, error, limit)
    return {"linear": ok, "relative_error": error, "tolerance": limit}
