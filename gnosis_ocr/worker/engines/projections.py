"""A decode step's q/k/v projections as one GEMM, its MLP's gate/up as one, over the same weights; and the
residual adds done by the GEMMs before them.

A CUDA graph replays a step's kernels one after the other, a few µs each whatever their size, and at
small batches their number sets the step time (`bench/kernel_count.py`). Qwen2.5-VL's decoder layer makes
three GEMMs of one input for q, k and v (k and v only 256 columns wide: a few thread blocks each on a
132-SM GPU) and two for the MLP's gate and up; vLLM and SGLang load them stacked and make one each. Here
the stacking is done in place once at start-up: each layer's q, k and v weights (and biases) are copied
one after the other into one tensor, and the modules' own parameters become views of it, so the model
holds no more memory than before and its own forward (the prefill) reads the same values. The step then
makes one GEMM over the stack and splits its output by views: 3 kernels a layer fewer (the GEMMs, and the
copy that joined q and k for the rotary embedding), 108 a step for Qwen2.5-VL-3B; and k and v come
out side by side, as a position of the cache holds them, so the step writes both with one scatter. And the
two residual adds of a layer (`x + o_proj(o)`, `x + down_proj(…)`) are each one GEMM that adds into the residual
stream in place (`addmm_`: cuBLAS adds into its output as it writes it), 72 kernels a step fewer.

A GEMM over more columns may sum in another order on a GPU (cuBLAS picks its kernel by shape), and one
that adds into its output rounds once where the module's call and the add round twice, so each device
checks all of them against the modules' own calls on the model's first layer, and keeps them only if they
agree to rounding (`rounding.py`; the stacks are the same bit for bit on the CPU, where the tests run).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .rounding import relative_error, tolerance

log = logging.getLogger(__name__)


class Stacked:
    """One decoder layer's stacked projections, `qkv(h)` and `mlp_into(x, …)`, each one GEMM."""

    __slots__ = ("qkv_weight", "qkv_bias", "gate_up_weight", "act")

    def __init__(self, attn, mlp) -> None:
        self.qkv_weight, self.qkv_bias = stack([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_weight, _ = stack([mlp.gate_proj, mlp.up_proj])
        self.act = mlp.act_fn

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv_weight, self.qkv_bias)

    def mlp_into(self, x: torch.Tensor, down: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
        """`x += down(act(gate(h)) * up(h))`, the library's MLP with gate and up read from one GEMM's halves
        and the residual add done by the down projection's GEMM; x `[rows, hidden]`, in place."""
        gate, up = F.linear(h, self.gate_up_weight).chunk(2, dim=-1)
        return add_into(x, down, self.act(gate) * up)


def add_into(x: torch.Tensor, linear: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """`x += linear(h)` as one GEMM that adds into x as it writes it (a linear without a bias); in place."""
    return x.addmm_(h.reshape(x.shape[0], -1), linear.weight.t())


def for_layers(layers: Sequence[torch.nn.Module], hidden: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[list[Stacked] | None, str]:
    """Every layer's projections stacked, where they can be and agree with the modules' own calls on this
    device; else None and why (the step then calls the modules)."""
    if not all(_stackable(layer) for layer in layers):
        return None, "the layers' projections are not plain linears of one input"
    before = _allocated(device)
    try:
        with torch.no_grad():
            stacked = [Stacked(layer.self_attn, layer.mlp) for layer in layers]
        grown = _allocated(device) - before
        if grown > 2**26:  # the old tensors were not freed: something else holds them (64 MiB: rounding)
            log.warning("stacking the projections on %s took %.0f MiB more: their old tensors are still held",
                        device, grown / 2**20)
        error = _check(layers[0], stacked[0], hidden, device, dtype)
    except Exception as exc:  # a faster step is optional; a worker that starts is not
        log.warning("stacked projections failed on %s (%s: %s); the step calls each projection", device,
                    type(exc).__name__, exc)
        return None, f"{type(exc).__name__}: {exc}"
    limit = tolerance(dtype)
    if error > limit:
        log.warning("stacked projections differ from the modules' on %s (relative error %.2e > %.0e); the step "
                    "calls each projection", device, error, limit)
        return None, f"relative error {error:.2e} > {limit:.0e}"
    return stacked, f"relative error {error:.2e}"


def stack(linears: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding `linears`' rows one after the other, as a view of the memory their
    parameters now share. Copied there the first time only: later calls find them laid out already."""
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    if any(b is None for b in biases):
        if any(b is not None for b in biases):
            raise ValueError("some of the projections have a bias and some do not")
        biases = None
    weight = _span(weights)
    if weight is None:
        weight = torch.cat([w.detach() for w in weights])
        _rebind(linears, "weight", weight)
    bias = None
    if biases is not None:
        bias = _span(biases)
        if bias is None:
            bias = torch.cat([b.detach() for b in biases])
            _rebind(linears, "bias", bias)
    return weight, bias


def _rebind(linears: Sequence[torch.nn.Linear], name: str, whole: torch.Tensor) -> None:
    """Each module's parameter `name` becomes its rows of `whole`: the old tensors are freed."""
    start = 0
    for lin in linears:
        rows = getattr(lin, name).shape[0]
        setattr(lin, name, torch.nn.Parameter(whole[start:start + rows], requires_grad=False))
        start += rows


def _span(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensor `parts` make together, if they lie one after the other in one storage; else None."""
    first = parts[0]
    if not all(p.is_contiguous() and p.dtype == first.dtype and p.device == first.device
               and p.shape[1:] == first.shape[1:] for p in parts):
        return None
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for part in parts:
        if part.untyped_storage().data_ptr() != storage.data_ptr() or part.storage_offset() != offset:
            return None
        offset += part.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.detach().new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]),
                                            (first.stride(0), *first.stride()[1:]))


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _stackable(layer) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(lin) is torch.nn.Linear for lin in linears) and callable(getattr(mlp, "act_fn", None))
            and linears[4].weight.shape == linears[5].weight.shape
            and linears[3].bias is None and linears[6].bias is None)  # what adds into the residual stream


def _check(layer, stacked: Stacked, hidden: int, device: torch.device, dtype: torch.dtype) -> float:
    """The largest relative error of the stacked q/k/v, the MLP and the attention's output added into the
    residual stream, against the modules' own calls, on hidden states of a decode step's shape and of the
    magnitudes a residual stream reaches."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 8)[:, None]
    h = (torch.randn(8, hidden, generator=generator) * scales).to(device, dtype)
    x = (torch.randn(8, hidden, generator=generator) * scales * 10).to(device, dtype)
    attn, mlp = layer.self_attn, layer.mlp
    o = (torch.randn(8, attn.o_proj.in_features, generator=generator) * scales).to(device, dtype)
    with torch.inference_mode():
        own = torch.cat((attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), dim=-1)
        return max(relative_error(stacked.qkv(h), own),
                   relative_error(stacked.mlp_into(x.clone(), mlp.down_proj, h), x + mlp(h)),
                   relative_error(add_into(x.clone(), attn.o_proj, o), x + attn.o_proj(o)))
