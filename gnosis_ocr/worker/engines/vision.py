"""Qwen2.5-VL's vision attention as one call per layer instead of one per window.

Outside flash-attention, transformers' vision attention splits each layer's tokens at `cu_seqlens`
and makes one SDPA call per window: an A4 page is about 96 windows of up to 64 patches, so a
32-layer tower launches about 3,000 small attention calls per page, serially, while the batch's
decoding waits. Here the windows of a layer are gathered into one padded batch (windows × heads ×
longest window × head_dim), padded keys are masked out, and a single SDPA call computes them all;
padded query rows are dropped on the way back. The arithmetic per window is the same attention over
the same keys, so the output matches the library's per-window path to rounding (the start-up check
and `tests/unit/test_vision.py` compare them).

On a GPU, where FlashAttention's variable-length kernel runs (`attention.unavailable`) and its start-up
check agrees, a layer's windows go to that kernel instead, as they lie: each window's queries against its
own keys by `cu_seqlens`, with no gather, no padding and no mask (`varlen`). The padded SDPA call stays
where it does not.

Only the attention call changes: the projections, rotary embedding and output projection are the
module's own weights and transformers' own `apply_rotary_pos_emb_vision`.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from . import attention
from .rounding import relative_error, tolerance

log = logging.getLogger(__name__)


class _Plan:
    """Where each window's tokens sit in the padded batch, or (`varlen`) the windows' offsets as the kernel
    takes them; the same for every layer of one forward.

    Windows all of one length (the full-attention layers of a chunk of equal pages, a page of whole
    windows) need no padding: the tokens are the batch as they lie, and the call takes no mask, which
    lets SDPA choose its flash kernel (a mask rules it out: on a GPU, the memory-efficient one runs)."""

    __slots__ = ("cu32", "cu_seqlens", "gather", "keep", "longest", "mask", "padded", "rows", "windows")

    def __init__(self, cu_seqlens: torch.Tensor, *, varlen: bool) -> None:
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        self.cu_seqlens = cu_seqlens
        self.windows = int(lengths.numel())
        self.longest = int(lengths.max()) if self.windows else 0
        self.cu32 = self.gather = self.keep = self.mask = self.rows = None
        if varlen:  # what the kernel takes: int32, and no empty windows (a release may repeat an offset)
            self.cu32 = torch.unique_consecutive(cu_seqlens).to(torch.int32)
            self.padded = False
            return
        self.padded = self.windows * self.longest != int(cu_seqlens[-1] - cu_seqlens[0])
        if not self.padded:
            return
        offsets = torch.arange(self.longest, device=cu_seqlens.device)
        self.keep = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # (windows, longest)
        last = int(cu_seqlens[-1]) - 1
        self.gather = (starts.unsqueeze(1) + offsets.unsqueeze(0)).clamp(max=max(last, 0))
        # Keys past a window's end are masked; every query row keeps at least its own window's keys.
        self.mask = self.keep[:, None, None, :]
        # The padded batch's rows that are tokens, in the tokens' order. Indexing with a boolean mask
        # would have to read how many rows it keeps off the device: a sync in each of 32 layers.
        self.rows = self.keep.flatten().nonzero().squeeze(1)


class _Plans:
    """Plans for the last few `cu_seqlens` tensors seen: a forward passes the same two (windows and
    full attention) to every layer, so each is built once per forward, not once per layer. One set per
    switch of the tower (`batch_window_attention`), so all its plans are for one path."""

    def __init__(self, *, varlen: bool, size: int = 4) -> None:
        self.varlen, self.size = varlen, size
        self.entries: list[_Plan] = []

    def get(self, cu_seqlens: torch.Tensor) -> _Plan:
        for plan in self.entries:
            if plan.cu_seqlens is cu_seqlens:
                return plan
        plan = _Plan(cu_seqlens, varlen=self.varlen)
        self.entries = [plan, *self.entries[: self.size - 1]]
        return plan


def _batched_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                     max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._gnosis_rotary(q, k, cos, sin)
    plan = self._gnosis_plans.get(cu_seqlens)
    if self._gnosis_plans.varlen:  # every window against its own keys, in place: (seq, heads, dim)
        out = attention.varlen(q, k, v, plan.cu32, plan.cu32, plan.longest, plan.longest, None, self.scaling)
        return self.proj(out.reshape(seq_length, -1))
    # (seq, heads, dim) -> (windows, heads, longest, dim)
    if plan.padded:
        q, k, v = (t[plan.gather].transpose(1, 2) for t in (q, k, v))
    else:
        q, k, v = (t.view(plan.windows, plan.longest, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=self.scaling)
    windows, heads, longest, dim = out.shape
    out = out.transpose(1, 2).reshape(windows * longest, heads, dim)
    if plan.padded:  # the rows that are tokens, out of (windows × longest), in the tokens' own order
        out = out[plan.rows]
    return self.proj(out.reshape(seq_length, -1).contiguous())


def batch_window_attention(model, *, varlen: bool = False) -> int:
    """Switch each vision attention module of a Qwen2.5-VL model to the one-call path (with `varlen`,
    FlashAttention's variable-length kernel; else one padded SDPA call). Returns how many were switched:
    0 where the model is not built as expected (another architecture, flash-attention already varlen),
    and then the library's path stays."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is None:
        return 0
    if "flash" in str(getattr(visual.config, "_attn_implementation", "") or ""):
        return 0  # flash-attention's varlen kernel already does every window in one call
    module = type(visual).__module__
    import importlib

    rotary = getattr(importlib.import_module(module), "apply_rotary_pos_emb_vision", None)
    blocks = getattr(visual, "blocks", [])
    attns = [getattr(b, "attn", None) for b in blocks]
    needed = ("qkv", "proj", "num_heads", "scaling")
    if rotary is None or not attns or not all(a is not None and all(hasattr(a, n) for n in needed) for a in attns):
        log.warning("vision attention not batched: %s is not built as this engine expects", type(visual).__name__)
        return 0
    plans = _Plans(varlen=varlen)  # shared by the layers: they see the same cu_seqlens tensors
    for attn in attns:
        attn._gnosis_rotary = rotary
        attn._gnosis_plans = plans
        attn.forward = types.MethodType(_batched_forward, attn)
    return len(attns)


def choose(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> dict:
    """Switch the vision tower to the fastest one-call path that runs on this device and matches the
    library's features on this page: FlashAttention's varlen kernel, else one padded SDPA call, else the
    library's own windows. Says which (`batched`, `varlen`) and why."""
    unavailable = varlen_unavailable(model)
    varlen = unavailable is None
    if not batch_window_attention(model, varlen=varlen):
        return {"batched": False, "varlen": False, "reason": "the vision tower is not built as this engine expects"}
    check = check_against_library(model, pixel_values, grid_thw, varlen=varlen)
    if varlen and not check["batched"]:
        log.warning("vision attention on %s: FlashAttention's varlen kernel does not match the library's (%s); "
                    "trying one padded SDPA call per layer", next(model.parameters()).device,
                    check.get("reason") or f"relative error {check['relative_error']:.2e}")
        batch_window_attention(model)
        check = {**check_against_library(model, pixel_values, grid_thw), "varlen_check": check}
        varlen = False
    return {**check, "varlen": varlen and check["batched"],
            **({"varlen_unavailable": unavailable} if unavailable else {})}


def varlen_unavailable(model) -> str | None:
    """Why FlashAttention's variable-length kernel cannot run this model's vision attention here, or None."""
    visual = model.model.visual
    weight = next(visual.parameters())
    heads = visual.blocks[0].attn.num_heads
    return attention.unavailable(weight.device, weight.dtype, visual.config.hidden_size // heads)


def restore_window_attention(model) -> None:
    """Back to the library's per-window path (the check compares the two on one model)."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    for block in getattr(visual, "blocks", []):
        attn = getattr(block, "attn", None)
        if attn is not None and "forward" in attn.__dict__:
            del attn.forward


def check_against_library(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, *, varlen: bool = False) -> dict:
    """One page's image features both ways on this device. The batched path (`varlen` or not, as switched
    on) stays only if it matches the library's to rounding (relative error under `tolerance` for the
    dtype); otherwise the library's path is restored, so a kernel or release that disagrees costs speed,
    never a wrong page."""
    visual = model.model.visual
    device = next(visual.parameters()).device
    dtype = next(visual.parameters()).dtype
    pixels, grid = pixel_values.to(device, dtype), grid_thw.to(device)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = visual(pixels, grid_thw=grid)
        return (out if torch.is_tensor(out) else out.pooler_output).float()

    try:
        got = run()
    except Exception as exc:  # a path that cannot run here costs speed, never the worker
        restore_window_attention(model)
        log.warning("batched vision attention failed on %s (%s: %s); using the library's per-window path", device,
                    type(exc).__name__, exc)
        return {"batched": False, "reason": f"{type(exc).__name__}: {exc}"}
    restore_window_attention(model)
    expected = run()
    error, limit = relative_error(got, expected), tolerance(dtype)
    ok = error <= limit
    if ok:
        batch_window_attention(model, varlen=varlen)
    else:
        log.warning("batched vision attention differs from the library's on %s (relative error %.2e > %.0e); "
                    "using the library's per-window path", device, error, limit)
    return {"batched": ok, "relative_error": error, "tolerance": limit}
