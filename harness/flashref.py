"""FlashAttention's variable-length forward, as its contract reads, in plain torch: the kernel exists only
on CUDA, so on a CPU the engine's calls into it are checked against this."""

from __future__ import annotations

import torch


def varlen(q, k, v, cu_q, cu_k, max_q, max_k, used_k, scale, *, honour_used: bool = True, head_map=None):
    """Sequence i: q's rows `cu_q[i]:cu_q[i+1]` against k's rows `cu_k[i]:cu_k[i] + used_k[i]` (to
    `cu_k[i+1]` without `used_k`); query head h reads KV head `h // (heads / kv_heads)`. `honour_used=False`
    and `head_map` make the broken kernels the start-up check must refuse."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    kv_of = head_map or (lambda h: h // group)
    index = torch.tensor([kv_of(h) for h in range(heads)])
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        start = int(cu_k[i])
        n = int(used_k[i]) if honour_used and used_k is not None else int(cu_k[i + 1]) - start
        assert 0 < n <= max_k, f"sequence {i} would read {n} keys, past max_k {max_k}"
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        keys, values = k[start:start + n][:, index].float(), v[start:start + n][:, index].float()
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), keys) * scale
        out[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out
