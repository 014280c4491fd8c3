"""A static-KV-cache decoder for Qwen2.5-VL: pages in fixed slots, one decode step for all of them.

`generate` is bound by Python and kernel launches (about 55-62 ms a step on an H200 whatever the
batch, docs/benchmarks.md). Here the KV cache is allocated once, every page owns a slot in it, and a
decode step for all slots is a fixed sequence of kernels over fixed buffers, so on CUDA it is
captured once per shape bucket as a CUDA graph and replayed: no Python and no launches per layer.

The prefill (vision tower and prompt) runs through the model's own forward, so the image features
and Qwen2.5-VL's 3-D rope positions are exactly the library's; its keys and values are copied into
the page's slot. After the prompt every position is text, where the three rope axes are equal, so a
decode position is the slot's own length plus the rope delta the prefill reported. Each slot has its
own length and delta: left padding never enters the cache, so a page decodes the same whatever its
batch-mates are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

from . import attention, norm, prefill, projections
from .prefill import Prefilled

log = logging.getLogger(__name__)

KV_ALIGN = 256
"""Cache lengths are multiples of this, so attention kernels see aligned shapes."""


def buckets(limit: int, first: int, growth: float) -> list[int]:
    """Increasing sizes from `first` to `limit`, each about `growth` times the last, `limit` included."""
    out, size = [], first
    while size < limit:
        out.append(size)
        size = max(size + 1, int(size * growth))
    out.append(limit)
    return out


def bucket_for(value: int, sizes: Sequence[int]) -> int:
    for size in sizes:
        if value <= size:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {sizes[-1]}")


class StaticDecoder:
    """Owns the KV cache of `slots` pages of up to `max_len` tokens each, and the decode step over them."""

    def __init__(self, model, *, slots: int, max_len: int, graphs: bool | None = None,
                 attention_mode: str = "flash") -> None:
        config = model.config.get_text_config()
        self.model = model
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        weight = self.lm.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.slots = slots
        self.max_len = -(-max_len // KV_ALIGN) * KV_ALIGN
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        # Token-major, a position's keys and values side by side: `[layer, slot, position, 2, kv head, dim]`.
        # A step writes both with one scatter; each is read through its own view, `[layer, slot, position,
        # kv head, dim]`, what FlashAttention's varlen kernel reads (rows two positions' worth apart).
        shape = (self.n_layers, slots, self.max_len, 2, self.n_kv, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k_cache, self.v_cache = self.kv_cache[:, :, :, 0], self.kv_cache[:, :, :, 1]
        rotary = self.lm.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().to(self.device)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        # The graphs' inputs and outputs: fixed addresses, rewritten in place between replays.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)  # tokens in the cache
        self.deltas = torch.zeros(slots, dtype=torch.long, device=self.device)  # rope position - cache index
        self.active = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        # The last step's final hidden states: what the start-up check compares, bit for bit.
        self.hidden = torch.zeros((slots, config.hidden_size), dtype=self.dtype, device=self.device)
        self.batch_buckets = buckets(slots, 1, 2.0)
        self.len_buckets = sorted({-(-b // KV_ALIGN) * KV_ALIGN for b in buckets(self.max_len, 512, 1.5)})
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self.scale = float(self.lm.layers[0].self_attn.scaling)
        # The RMSNorm as one fused kernel, or the library's arithmetic bit for bit, or the module's call.
        self.rms, self.rms_path, self.rms_reason = norm.for_model(self.lm.norm, config.hidden_size, self.device,
                                                                  self.dtype)
        # Each layer's q/k/v and gate/up as one GEMM each, where they agree with the modules' own calls.
        self.stacked, self.stacked_reason = projections.for_layers(self.lm.layers, config.hidden_size, self.device,
                                                                   self.dtype)
        with self.device_context():
            self.attention_check = attention.choose(attention_mode, self.device, self.dtype, heads=self.n_heads,
                                                    kv_heads=self.n_kv, head_dim=self.head_dim, scale=self.scale)
        self.attention = self.attention_check["attention"]
        # Where each slot's query and keys begin, for the flash kernel (int32, as it takes them).
        self._cu_q = torch.arange(slots + 1, dtype=torch.int32, device=self.device)
        self._cu_k = self._cu_q * self.max_len
        # Two pinned host buffers and their events, alternated: the tokens of the step being read and of
        # the one launched after it, each copied off the device without a sync.
        cuda = self.device.type == "cuda"
        self._host = [torch.zeros(slots, dtype=torch.long, pin_memory=True) for _ in range(2)] if cuda else []
        self._events = [torch.cuda.Event() for _ in range(2)] if cuda else []
        self._flip = 0
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.captures = 0  # graph captures so far: a steady state adds none

    @staticmethod
    def slot_bytes(model, max_len: int) -> int:
        """GPU memory one slot's keys and values take."""
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
        return per_token * (-(-max_len // KV_ALIGN) * KV_ALIGN) * model.dtype.itemsize

    # --- prefill -------------------------------------------------------------------------------------

    def prefill(self, slots: Sequence[int], pages: Sequence[dict]) -> list[int]:
        """Run prompts of equal length through the model and seat them in `slots`, one after the other
        on this thread's stream. Returns each page's first generated token (greedy)."""
        return self.seat(slots, self.forward(pages))

    def forward(self, pages: Sequence[dict], *, stream=None) -> Prefilled:
        """The prefill's work, writing nothing of this decoder's (`prefill.forward`); `seat` puts it in slots."""
        return prefill.forward(self, pages, stream=stream)

    @torch.inference_mode()
    def seat(self, slots: Sequence[int], prefilled: Prefilled, rows: Sequence[int] | None = None) -> list[int]:
        """Copy the forward's pages in `rows` (all, by default), one per slot, into `slots` and make them
        decode from the next step on, on this thread's stream (behind the step in flight). Returns their
        first tokens."""
        n = prefilled.n
        rows = list(range(len(slots))) if rows is None else list(rows)
        # Consecutive rows (the usual case: seated in order) are a view; others a gather.
        pick = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[0] + len(rows))) else rows
        with self.device_context():
            if prefilled.event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(prefilled.event)
                # Made on the forward's stream and read here: the allocator must not hand their memory to
                # that stream's next work before these copies are done.
                for tensor in (prefilled.first, *(t for pair in prefilled.layers for t in pair)):
                    tensor.record_stream(stream)
            index = torch.tensor(list(slots), device=self.device)
            if isinstance(pick, list):
                pick = torch.tensor(pick, device=self.device)
            for layer, (keys, values) in enumerate(prefilled.layers):
                self.k_cache[layer, index, :n] = keys[pick].transpose(1, 2).to(self.dtype)
                self.v_cache[layer, index, :n] = values[pick].transpose(1, 2).to(self.dtype)
            self.tokens[index] = prefilled.first[pick]
            self.lengths[index] = n
            self.deltas[index] = prefilled.deltas[rows].to(self.device)
            self.active[index] = 1
        return [prefilled.firsts[r] for r in rows]

    def side_stream(self):
        """A stream of this decoder's GPU for prefills beside the decode steps; None off CUDA."""
        return torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def release(self, slot: int) -> None:
        self.active[slot] = 0
        self.lengths[slot] = 0

    def pause(self, slots: Sequence[int]) -> None:
        """Freeze these slots: steps compute them but neither advance their tokens nor their lengths."""
        self.active[list(slots)] = 0

    def resume(self, slots: Sequence[int]) -> None:
        self.active[list(slots)] = 1

    # --- the device ----------------------------------------------------------------------------------

    def device_context(self):
        """Kernels, streams and graph captures on this decoder's GPU, whatever the thread's current one."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def bind_thread(self, *, steps: bool = False) -> None:
        """Make this decoder's GPU the calling thread's current device (the loop's and the prefill thread's,
        once each). For the loop's, with `steps`, also a stream of the device's high priority, ordered after
        all that was queued before (the warm-up): with prefills beside the steps, the GPU hands the SMs that
        a prefill's kernels free to a step's first instead of sharing them alike (a priority orders waiting
        work; nothing running is preempted). A graph's kernels take the priority of the stream it is
        replayed on."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if steps:
                stream = torch.cuda.Stream(device=self.device, priority=-1)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                torch.cuda.set_stream(stream)

    def healthy(self) -> bool:
        """Whether the device still runs work: after a sticky CUDA error every call raises."""
        try:
            with self.device_context():
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return int(torch.ones(1, device=self.device).add_(1).item()) == 2
        except Exception:
            log.exception("device %s failed its health probe", self.device)
            return False

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            with self.device_context():
                torch.cuda.empty_cache()

    # --- decode --------------------------------------------------------------------------------------

    def step(self, batch: int, length: int) -> torch.Tensor:
        """One greedy step for slots [0, batch): attention over the first `length` cache positions.

        Active slots' tokens advance and their lengths grow by one; returns the next tokens (on device)."""
        b = bucket_for(batch, self.batch_buckets)
        L = bucket_for(length, self.len_buckets)
        with self.device_context():
            if self.use_graphs:
                graph = self._graphs.get((b, L))
                if graph is None:
                    graph = self._capture(b, L)
                graph.replay()
            else:
                with torch.inference_mode():
                    self._step(b, L)
        return self.next_tokens[:b]

    def launch(self, batch: int, length: int) -> Launched:
        """`step`, returning before the device has finished it: its next tokens are copied to the host
        behind it on the device's queue, so the caller can queue the next step before it reads these
        with `collect`. At most two launched steps may be unread at a time (two host buffers)."""
        tokens = self.step(batch, length)
        if self.device.type != "cuda":
            return Launched(tokens.clone(), None)  # computed already; the next step overwrites the buffer
        with self.device_context():
            host, event = self._host[self._flip][: tokens.shape[0]], self._events[self._flip]
            self._flip ^= 1
            host.copy_(tokens, non_blocking=True)
            event.record()
        return Launched(host, event)

    @staticmethod
    def collect(launched: Launched) -> list[int]:
        """A launched step's next tokens, once the device has computed them (waited for without the GIL)."""
        if launched.event is not None:
            launched.event.synchronize()
        return launched.tokens.tolist()

    def warm_up(self) -> int:
        """Capture every (batch, length) graph now, so no page ever waits for a capture."""
        if self.use_graphs:
            with self.device_context():
                for b in self.batch_buckets:
                    for L in self.len_buckets:
                        if (b, L) not in self._graphs:
                            self._capture(b, L)
        return len(self._graphs)

    def self_check(self, batch: int, length: int) -> dict:
        """The decode step as replayed (a graph, on CUDA) against the same step run eagerly on the same
        inputs: next tokens and final hidden states must be bit-identical. Leaves the state as one step
        would. A graph recorded on the wrong device or stream replays nothing, and fails here."""
        b = bucket_for(batch, self.batch_buckets)
        L = bucket_for(length, self.len_buckets)
        state = (self.tokens, self.lengths, self.active)
        with self.device_context():
            saved = [t.clone() for t in state]
            with torch.inference_mode():
                self._step(b, L)
            eager_hidden, eager_next = self.hidden[:b].clone(), self.next_tokens[:b].clone()
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
            self.hidden.zero_()
            self.next_tokens.fill_(-1)
            self.step(batch, length)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            hidden_equal = bool(torch.equal(self.hidden[:b], eager_hidden))
            tokens_equal = bool(torch.equal(self.next_tokens[:b], eager_next))
            max_diff = float((self.hidden[:b].float() - eager_hidden.float()).abs().max())
        return {"device": str(self.device), "graphs": self.use_graphs, "batch": b, "length": L,
                "identical": hidden_equal and tokens_equal, "tokens_equal": tokens_equal,
                "max_abs_diff": max_diff}

    def _capture(self, b: int, L: int) -> torch.cuda.CUDAGraph:
        state = (self.tokens, self.lengths, self.active)  # what a step advances: put back after each run
        saved = [t.clone() for t in state]
        # On this decoder's device: a stream or capture on another GPU records none of its kernels.
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            self._step(b, L)  # warm-up run outside the graph: kernels choose their algorithms here
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for t, s in zip(state, saved, strict=True):
            t.copy_(s)
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            self._step(b, L)  # recorded, not run: only the warm-up moved the state
        self._graphs[(b, L)] = graph
        self.captures += 1
        return graph

    def _step(self, b: int, L: int) -> None:
        pos = self.lengths[:b]
        x = self.lm.embed_tokens(self.tokens[:b]).unsqueeze(1)  # [b, 1, hidden]
        freqs = (pos + self.deltas[:b]).unsqueeze(-1).float() * self.inv_freq  # [b, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[:, None, None, :]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)[:, None, None, :]
        # rotate_half(x) * sin == swap_halves(x) * (sin with its first half negated), bit for bit (a sign
        # flip is exact): one kernel fewer a layer than negating the half of x (`_rotate`).
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        if self.attention == "flash":  # each slot reads its own keys only
            used = (pos + 1).clamp(max=L).to(torch.int32)
            cu_q, cu_k = self._cu_q[: b + 1], self._cu_k[: b + 1]
        else:
            mask = attention.sdpa_mask(pos, L, self.dtype)
        where = pos.view(b, 1, 1, 1).expand(b, 1, self.n_kv, self.head_dim)
        where_kv = pos.view(b, 1, 1, 1, 1).expand(b, 1, 2, self.n_kv, self.head_dim)
        qk_heads = self.n_heads + self.n_kv
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            h = self.rms(layer.input_layernorm, x)
            # The rotary embedding of q and k in one pass: the same arithmetic on each element, in 4
            # kernels instead of 10. A graph replays every kernel one after the other, and at small
            # batches their number, not the weights' bytes, sets the step time (bench/kernel_count.py).
            if self.stacked is not None:  # q, k and v are views of one GEMM's output, in that order
                qkv = self.stacked[i].qkv(h).view(b, 1, qk_heads + self.n_kv, self.head_dim)
                qk = qkv[:, :, :qk_heads]
                # Written back in place: the rotated k and v then lie side by side as a position of the
                # cache does, and one scatter writes both.
                _rotate(qk, cos, sin, out=qk)
                q = qkv[:, :, : self.n_heads]
                self.kv_cache[i, :b].scatter_(1, where_kv, qkv[:, :, self.n_heads:].view(b, 1, 2, self.n_kv,
                                                                                      self.head_dim))
            else:
                q = attn.q_proj(h).view(b, 1, self.n_heads, self.head_dim)
                k = attn.k_proj(h).view(b, 1, self.n_kv, self.head_dim)
                v = attn.v_proj(h).view(b, 1, self.n_kv, self.head_dim)
                qk = torch.cat((q, k), dim=2)
                qk = _rotate(qk, cos, sin)
                q, k = qk[:, :, : self.n_heads], qk[:, :, self.n_heads:]
                self.k_cache[i, :b].scatter_(1, where, k)
                self.v_cache[i, :b].scatter_(1, where, v)
            k_cache, v_cache = self.k_cache[i, :b], self.v_cache[i, :b]
            if self.attention == "flash":
                o = attention.flash(q, k_cache, v_cache, used, cu_q, cu_k, L, self.scale)
            else:
                o = attention.sdpa(q, k_cache, v_cache, mask, L, self.scale)
            if self.stacked is not None:  # the residual adds done by the GEMMs, into x in place
                projections.add_into(x.view(b, -1), attn.o_proj, o)
                self.stacked[i].mlp_into(x.view(b, -1), layer.mlp.down_proj,
                                         self.rms(layer.post_attention_layernorm, x))
            else:
                x = x + attn.o_proj(o.reshape(b, 1, self.n_heads * self.head_dim))
                x = x + layer.mlp(self.rms(layer.post_attention_layernorm, x))
        hidden = self.rms(self.lm.norm, x[:, 0])
        self.hidden[:b].copy_(hidden)
        nxt = self.lm_head(hidden).argmax(-1)
        self.next_tokens[:b].copy_(nxt)
        active = self.active[:b]
        self.tokens[:b].copy_(torch.where(active.bool(), nxt, self.tokens[:b]))
        self.lengths[:b].add_(active)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The rotary embedding of `x` (q and k together), with `sin`'s first half already negated."""
    half = x.shape[-1] // 2
    return torch.add(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin, out=out)


class Launched:
    """A decode step on its way: where its next tokens will be, and the event that says they are there."""

    __slots__ = ("event", "tokens")

    def __init__(self, tokens: torch.Tensor, event) -> None:
        self.tokens, self.event = tokens, event
