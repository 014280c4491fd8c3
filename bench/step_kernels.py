"""A decode step kernel by kernel, and what fusing its small kernels would save: the GPU benchmark's
`kernels` section (`bench/gpu_engine.py`), on the engine it has loaded.

At small batches a decode step is its kernels run one after the other, a few µs each
(`bench/kernel_count.py` counts 15 a decoder layer), more than the weights it reads. Two things say
whether fewer kernels would pay, and which:
- one eager step profiled per batch (a replay runs the same kernels), beside the replayed step's time;
- each candidate fusion timed both ways on the model's own weights, 36 times over (one step's worth),
  captured as a CUDA graph as the step is: RMSNorm in the library's arithmetic (7 kernels) against
  `F.rms_norm` (one kernel where the build has a fused one), q/k/v as three GEMMs against one, and
  gate/up as two against one, a residual add after its GEMM against the GEMM adding into its output; with
  how far apart their outputs are. The step runs the faster of each
  where its start-up check passes (`engines/norm.py`, `engines/projections.py`): here is what that saves.

And whether a prefill keeps the device busy: one page against a 4-page chunk, with the share of the
wall time its kernels took.

The `decode_attention` section replays a step with each of the decode attentions (`engines/attention.py`)
on the same slots, of lengths such as pages in flight have.

On a CPU (`--tiny`) the same code runs on top-level ops and plain calls: it checks the script, not speed.
"""

from __future__ import annotations

import time


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernels(torch, engine, batches: list[int], page=None, length: int = 2048, reps: int = 50,
            top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    decoder = engine.schedulers[0].decoder  # idle here: every page of the earlier sections has ended
    cuda = decoder.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    length = min(length, decoder.len_buckets[-1])
    prompt = engine._request(page).length if page is not None else length // 2
    out = {"length": length, "rows": []}
    for b in sorted({min(b, decoder.slots) for b in batches}):
        mean_length = seat(torch, decoder, b, length, prompt)
        with decoder.device_context(), torch.inference_mode():
            decoder._step(b, length)  # warm; empty slots advance nothing
            sync(torch)
            with profile(activities=activities) as prof:
                decoder._step(b, length)
                sync(torch)
            started = time.perf_counter()
            for _ in range(reps):
                decoder.step(b, length)  # a graph replay on CUDA
            sync(torch)
            step_ms = (time.perf_counter() - started) / reps * 1000
        device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        ran: dict[str, list[float]] = {}
        for event in prof.events():
            if event.device_type == device_type and (cuda or event.cpu_parent is None):
                ran.setdefault(event.name, []).append(event.time_range.elapsed_us())
        total = sum(sum(t) for t in ran.values())
        count = sum(len(t) for t in ran.values())
        out["rows"].append({
            "batch": b, "mean_length": mean_length, "attention": decoder.attention, "kernels": count,
            "kernel_us": round(total, 1), "step_ms": round(step_ms, 3),
            "us_per_kernel": round(total / max(count, 1), 2),
            "top": [{"name": name[:90], "count": len(t), "us": round(sum(t), 1)}
                    for name, t in sorted(ran.items(), key=lambda kv: -sum(kv[1]))[:top]],
            "fusions": fusions(torch, decoder, b)})
    decoder.lengths.zero_()
    if page is not None:
        out["prefills"] = prefills(torch, engine, page)
    return out


def decode_attention(torch, engine, batches: list[int], prompt: int, decoded: int = 600, reps: int = 50) -> dict:
    """A decode step replayed with each attention the device has (`sdpa`, and `flash` where its start-up
    check kept it), at each batch and two length buckets: the one a page `decoded` tokens into its output
    sits in, and the largest (one long page in the batch sets it for every slot). The slots' lengths are
    as `seat` puts them, so `flash` reads what such pages hold, and `sdpa` the whole bucket for each."""
    from gnosis_ocr.worker.engines.decoder import bucket_for

    decoder = engine.schedulers[0].decoder  # idle here: every page of the earlier sections has ended
    chosen, graphs = decoder.attention, decoder._graphs
    modes = ["sdpa"] + (["flash"] if decoder.attention_check["attention"] == "flash" else [])
    out = {"check": decoder.attention_check, "rows": []}
    try:
        for L in sorted({bucket_for(min(prompt + decoded, decoder.max_len), decoder.len_buckets),
                         decoder.len_buckets[-1]}):
            for b in sorted({min(b, decoder.slots) for b in batches}):
                row = {"batch": b, "length_bucket": L, "mean_length": seat(torch, decoder, b, L, prompt)}
                for mode in modes:
                    decoder.attention, decoder._graphs = mode, {}
                    with decoder.device_context():
                        decoder.step(b, L)  # captured (on CUDA) and warm
                        sync(torch)
                        started = time.perf_counter()
                        for _ in range(reps):
                            decoder.step(b, L)
                        sync(torch)
                    row[f"{mode}_ms"] = round((time.perf_counter() - started) / reps * 1000, 3)
                if "flash_ms" in row:
                    row["sdpa_over_flash"] = round(row["sdpa_ms"] / row["flash_ms"], 2)
                out["rows"].append(row)
    finally:
        decoder.attention, decoder._graphs = chosen, graphs
        decoder.lengths.zero_()
        decoder.active.zero_()
    return out


def seat(torch, decoder, b: int, L: int, prompt: int) -> int:
    """Slots [0, b) as pages in flight: lengths spread evenly from the bucket's end `L` down to the prompt's
    (one slot: at the end), all paused, so steps read them and advance nothing. Returns the mean length."""
    lengths = torch.linspace(L - 1, min(prompt, L - 1), b).long()
    with decoder.device_context():
        decoder.lengths[:b] = lengths.to(decoder.device)
        decoder.active.zero_()
    return round(float(lengths.float().mean()))


def prefills(torch, engine, page, sizes: tuple[int, ...] = (1, 4), reps: int = 3) -> dict:
    """A prefill of 1 page and of a 4-page chunk: wall time per page, and how much of it the device was
    busy (its kernels' time over the wall time). Once the batch is full most prefills are one page (pages
    end one at a time); if the device idles through much of a one-page prefill, the host's launches bound
    it, and gathering freed slots into bigger chunks would pay (docs/benchmarks.md)."""
    from torch.profiler import ProfilerActivity, profile

    decoder = engine.schedulers[0].decoder  # idle here: its slots are free
    cuda = decoder.device.type == "cuda"
    one = engine._request(page).inputs
    out = {}
    for n in sizes:
        n = min(n, decoder.slots)
        slots = list(range(n))

        def run() -> None:
            with decoder.device_context():
                decoder.prefill(slots, [dict(one) for _ in slots])
            for slot in slots:
                decoder.release(slot)

        run()  # warm
        sync(torch)
        started = time.perf_counter()
        for _ in range(reps):
            run()
        sync(torch)
        wall_ms = (time.perf_counter() - started) / reps * 1000
        busy = None
        if cuda:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                sync(torch)
            kernel_us = sum(e.time_range.elapsed_us() for e in prof.events()
                            if e.device_type == torch.autograd.DeviceType.CUDA)
            busy = round(kernel_us / 1000 / wall_ms, 3)
        out[f"pages_{n}"] = {"ms": round(wall_ms, 1), "ms_per_page": round(wall_ms / n, 1), "device_busy": busy}
    out["behind_a_step"] = behind_a_step(torch, engine, one, reps=reps)
    return out


def behind_a_step(torch, engine, one: dict, reps: int = 3) -> dict:
    """A one-page prefill started while a full batch's decode step is on the device, as in the engine's loop:
    on the step's stream, where the prefill's first read off the device waits for the step, and on a stream
    of its own, where its reads wait for its own work only and its kernels may run beside the step's (as
    OCR_PREFILL_CONCURRENT runs it: the forward on its stream, the seat behind the step), and the same beside
    a step on a high-priority stream, as the loop's thread steps then. Against the step and the prefill
    alone: what the prefill stream saves, and what the priority does to the step (docs/benchmarks.md).
    The batch is paused (nothing advances) and the page goes into its last slot. A CPU has no streams: there
    the dry run goes through the rest."""
    from gnosis_ocr.worker.engines.decoder import bucket_for

    decoder = engine.schedulers[0].decoder
    b, slot, prompt = decoder.slots, [decoder.slots - 1], one["input_ids"].shape[1]
    L = bucket_for(min(prompt + 600, decoder.max_len), decoder.len_buckets)  # pages 600 tokens in, as above
    seat(torch, decoder, b, L, prompt)
    cuda = decoder.device.type == "cuda"
    side = torch.cuda.Stream(device=decoder.device) if cuda else None
    high = torch.cuda.Stream(device=decoder.device, priority=-1) if cuda else None

    def step() -> None:
        decoder.step(b, L)

    def priority_step() -> None:  # as the loop's thread steps with prefills beside (`bind_thread`)
        if high is None:
            return step()
        high.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(high):
            step()
        torch.cuda.current_stream(decoder.device).wait_stream(high)

    def prefill() -> None:
        decoder.prefill(slot, [dict(one)])

    def on_side() -> None:
        # As the engine does with OCR_PREFILL_CONCURRENT: the forward on a stream of its own, not ordered
        # after the step (its inputs come from the host), and the seat behind the step on the step's stream.
        decoder.seat(slot, decoder.forward([dict(one)], stream=side))

    def timed(*parts) -> float:
        with decoder.device_context():
            for part in parts:  # warm
                part()
            sync(torch)
            started = time.perf_counter()
            for _ in range(reps):
                for part in parts:
                    part()
            sync(torch)
        return round((time.perf_counter() - started) / reps * 1000, 2)

    try:
        return {"batch": b, "length_bucket": L, "step_ms": timed(step), "prefill_ms": timed(prefill),
                "step_then_prefill_ms": timed(step, prefill), "prefill_on_its_own_stream_ms": timed(step, on_side),
                "priority_step_ms": timed(priority_step),
                "prefill_beside_a_priority_step_ms": timed(priority_step, on_side)}
    finally:
        decoder.release(slot[0])
        decoder.lengths.zero_()
        decoder.active.zero_()


def fusions(torch, decoder, batch: int, reps: int = 20) -> dict:
    """Each candidate fusion both ways on layer 0's weights, as many times as one step has layers: ms per
    step for each, and the largest difference between their outputs."""
    import torch.nn.functional as F

    from gnosis_ocr.worker.engines import norm as step_norm

    layer = decoder.lm.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    norm = layer.input_layernorm
    x = torch.randn(batch, 1, norm.weight.shape[0], device=decoder.device, dtype=decoder.dtype)
    qkv = _fused_linear(torch, attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up = _fused_linear(torch, mlp.gate_proj, mlp.up_proj)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    # The residual add done by the o projection's GEMM (`addmm_`, in place): timed on a scratch copy of the
    # residual stream (its values drift over the replays; the time does not), compared on a fresh one.
    residual, o = x[:, 0].clone(), torch.randn_like(x[:, 0])
    scratch = residual.clone()
    candidates = {  # name: (as the library runs it, fused, how many a layer, fused for the comparison)
        "rms_norm": (lambda: (step_norm.rms_norm(norm, x),), lambda: F.rms_norm(x, (x.shape[-1],), norm.weight, eps),
                     2, None),
        "qkv": (lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), lambda: qkv(x), 1, None),
        "gate_up": (lambda: (mlp.gate_proj(x), mlp.up_proj(x)), lambda: gate_up(x), 1, None),
        "residual_add": (lambda: (residual + attn.o_proj(o),), lambda: scratch.addmm_(o, attn.o_proj.weight.t()), 2,
                         lambda: residual.clone().addmm_(o, attn.o_proj.weight.t())),
    }
    out = {}
    for name, (library, fused, per_layer, fused_once) in candidates.items():
        calls = per_layer * decoder.n_layers
        with decoder.device_context(), torch.inference_mode():
            difference = float((torch.cat(library(), dim=-1).float() - (fused_once or fused)().float()).abs().max())
            out[name] = {"library_ms": _replay_ms(torch, library, calls, reps, decoder.device),
                         "fused_ms": _replay_ms(torch, fused, calls, reps, decoder.device),
                         "max_abs_diff": difference}
    return out


def _fused_linear(torch, *linears):
    """One GEMM for several linears of the same input (their weights and biases stacked)."""
    import torch.nn.functional as F

    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if all(lin.bias is not None for lin in linears) else None
    return lambda x: F.linear(x, weight, bias)


def _replay_ms(torch, fn, calls: int, reps: int, device) -> float:
    """ms for `calls` calls of `fn` in a row: captured once as a CUDA graph and replayed (as the decode
    step is), or called on a CPU."""
    def run() -> None:
        for _ in range(calls):
            fn()

    run()  # warm: kernels choose their algorithms
    sync(torch)
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    started = time.perf_counter()
    for _ in range(reps):
        run()
    sync(torch)
    return round((time.perf_counter() - started) / reps * 1000, 3)
