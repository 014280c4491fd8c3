"""The decode step's attention: each slot's one new query against the keys and values in its own cache.

A layer's keys and values are each `[slots, max_len, kv_heads, head_dim]`, token-major (views of one
cache holding a position's keys and values side by side): the layout FlashAttention's variable-length
kernel reads, rows two positions' worth apart. Two ways to attend over it, chosen per device at start-up
(`OCR_DECODE_ATTENTION`):

- `sdpa`: torch's `scaled_dot_product_attention` over the first `L` positions of every slot of the step,
  those past a slot's own length masked out. `L` is the step's length bucket, set by its longest page,
  so every slot reads `L` keys and values: at 128 slots with one long page among them, mostly padding.
  And on a GPU the memory-efficient kernel it takes for a masked call divides the work by slot and KV
  head only: one page is 2 thread blocks a layer on a 132-SM GPU, each reading its head's cache alone.
- `flash`: FlashAttention's variable-length kernel, the one behind torch's own SDPA flash backend,
  called directly for its `seqused_k`: each slot reads only its own keys, and a small batch is split
  along the keys (flash-decoding). CUDA, fp16 and bf16 only.

`flash` serves only where a check on the device, before any graph is captured, finds it equal to `sdpa`
to rounding on random caches of ragged lengths (and a graph replay of it equal to the eager call);
otherwise `sdpa`, with the reason logged. A kernel or release that disagrees costs speed, never a page.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .rounding import relative_error, tolerance

log = logging.getLogger(__name__)


def sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor, L: int,
         scale: float) -> torch.Tensor:
    """q `[b, 1, heads, d]`, caches `[b, max_len, kv_heads, d]`, mask `[b, 1, 1, L]`: `[b, heads, d]`.

    The query heads that share a KV head become that head's "query positions": one plain SDPA call reads
    each key and value once (`enable_gqa` would fall back to copying them per head)."""
    b, _, heads, d = q.shape
    kv = k_cache.shape[2]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, heads // kv, d), k_cache[:, :L].transpose(1, 2),
                                         v_cache[:, :L].transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(b, heads, d)


def sdpa_mask(pos: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """`[b, 1, 1, L]`: 0 where a slot's key is at or before its position `pos`, the dtype's minimum after."""
    visible = torch.arange(L, device=pos.device)[None, :] <= pos[:, None]
    mask = torch.zeros((pos.shape[0], 1, 1, L), dtype=dtype, device=pos.device)
    return mask.masked_fill_(~visible[:, None, None, :], torch.finfo(dtype).min)


def flash(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor, cu_q: torch.Tensor,
          cu_k: torch.Tensor, L: int, scale: float) -> torch.Tensor:
    """As `sdpa`, slot i reading its first `used[i]` keys only (int32, at most `L`). `cu_q` is
    `0, 1, …, b` and `cu_k` is `0, max_len, …, b·max_len` (int32): where each slot's query and keys begin."""
    b, _, heads, d = q.shape
    max_len, kv = k_cache.shape[1], k_cache.shape[2]
    return varlen(q.reshape(b, heads, d), k_cache.reshape(b * max_len, kv, d), v_cache.reshape(b * max_len, kv, d),
                  cu_q, cu_k, 1, L, used, scale)


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
           max_k: int, used_k: torch.Tensor, scale: float) -> torch.Tensor:
    """FlashAttention's variable-length forward. q `[total_q, heads, d]`, k and v `[total_k, kv_heads, d]`:
    sequence i is q's rows `cu_q[i]:cu_q[i+1]` against k's rows `cu_k[i]:cu_k[i] + used_k[i]`, and query
    head h reads KV head `h // (heads / kv_heads)`. (The tests put a reference of this contract here on
    a CPU, where the kernel does not exist.)"""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   scale=scale, seqused_k=used_k)[0]


def unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why `flash` cannot run here, or None."""
    if device.type != "cuda":
        return f"no FlashAttention kernel on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention takes fp16 or bf16, not {str(dtype).removeprefix('torch.')}"
    if head_dim % 8 or head_dim > 256:
        return f"FlashAttention does not take a head size of {head_dim}"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no FlashAttention"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "FlashAttention needs compute capability 8.0 or newer"
    if "seqused_k" not in str(torch.ops.aten._flash_attention_forward.default._schema):
        return "this torch's FlashAttention takes no seqused_k"
    return None


def choose(requested: str, device: torch.device, dtype: torch.dtype, *, heads: int, kv_heads: int, head_dim: int,
           scale: float) -> dict:
    """The attention this device's decode steps use, and why: `{"attention": "flash" or "sdpa", …}`."""
    if requested == "sdpa":
        return {"attention": "sdpa", "reason": "OCR_DECODE_ATTENTION=sdpa"}
    try:
        reason = unavailable(device, dtype, head_dim)
        if reason is not None:
            log.info("decode attention on %s: sdpa (%s)", device, reason)
            return {"attention": "sdpa", "reason": reason}
        check = compare(device, dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim, scale=scale)
    except Exception as exc:  # a kernel that cannot run here costs speed, never the worker
        log.warning("decode attention on %s: sdpa (FlashAttention failed its check: %s: %s)", device,
                    type(exc).__name__, exc)
        return {"attention": "sdpa", "reason": f"FlashAttention failed its check: {type(exc).__name__}: {exc}"}
    if not check["agrees"]:
        log.warning("decode attention on %s: sdpa (FlashAttention differs from SDPA: relative error %.2e > %.0e, "
                    "graph replay identical: %s)", device, check["relative_error"], check["tolerance"],
                    check["graph_identical"])
        return {"attention": "sdpa", "reason": "FlashAttention differs from SDPA", **check}
    log.info("decode attention on %s: flash (relative error %.1e against SDPA)", device, check["relative_error"])
    return {"attention": "flash", **check}


def compare(device: torch.device, dtype: torch.dtype, *, heads: int, kv_heads: int, head_dim: int, scale: float,
            lengths: tuple[int, ...] = (1, 77, 300, 511), max_len: int = 512) -> dict:
    """`flash` against `sdpa` on random caches whose slots hold `lengths` keys each, the keys and values
    past each length set large: a kernel that read one of them, or paired a query head with the wrong KV
    head, would be far off. On CUDA a graph replay of `flash` must also equal its eager call."""
    b = len(lengths)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    # The decoder's layout: a position's keys and values side by side, each read through its own view.
    q, kv = rand(b, 1, heads, head_dim), rand(b, max_len, 2, kv_heads, head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    for slot, n in enumerate(lengths):
        k[slot, n:], v[slot, n:] = 8.0, 1000.0
    pos = torch.tensor([n - 1 for n in lengths], device=device)
    used = (pos + 1).to(torch.int32)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=device)
    cu_k = cu_q * max_len
    with torch.inference_mode():
        expected = sdpa(q, k, v, sdpa_mask(pos, max_len, dtype), max_len, scale).float()
        got = flash(q, k, v, used, cu_q, cu_k, max_len, scale)
        graph_identical = True
        if device.type == "cuda":
            graph_identical = bool(torch.equal(_replayed(lambda: flash(q, k, v, used, cu_q, cu_k, max_len, scale),
                                                         device), got))
    error, limit = relative_error(got, expected), tolerance(dtype)
    return {"agrees": error <= limit and graph_identical, "relative_error": error, "tolerance": limit,
            "graph_identical": graph_identical}


def _replayed(fn, device: torch.device) -> torch.Tensor:
    """`fn()` captured as a CUDA graph on `device` and replayed once: what a decode graph would compute."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # warm-up outside the graph
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize(device)
    return out
