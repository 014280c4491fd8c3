"""The GPU benchmark's checks of the engine's own paths against the library's (`bench/gpu_engine.py`, on the
engine it has loaded): the vision tower timed both ways with the distance between their features, and the
tokens of the fast path against plain `generate`, in bf16 (with the logit margin at each first divergence)
and in float32 with TF32 off."""

from __future__ import annotations

import os
import time

from bench.gpu_engine import requests_for, sync


def vision(torch, engine, page, pages: int, reps: int = 3) -> dict:
    """The vision tower alone on `pages` A4 pages at once, the library's way (per-window attention, a Conv3d
    patch embedding) against the engine's (one attention call per layer, the patch embedding as one GEMM:
    gnosis_ocr/worker/engines/vision.py and patch_embed.py), timed in the same process, and how far apart
    their features are; the one call both as a padded SDPA call and, where the engine kept it, through
    FlashAttention's varlen kernel; and the patch embedding alone both ways."""
    from gnosis_ocr.worker.engines import patch_embed
    from gnosis_ocr.worker.engines.rounding import relative_error
    from gnosis_ocr.worker.engines.vision import batch_window_attention, restore_window_attention

    model = engine.models[0]
    visual = model.model.visual
    one = engine._request(page).inputs
    device, dtype = next(visual.parameters()).device, next(visual.parameters()).dtype
    pixels = torch.cat([one["pixel_values"]] * pages).to(device, dtype)
    grid = torch.cat([one["image_grid_thw"]] * pages).to(device)

    def timed(fn) -> tuple[float, object]:
        with torch.inference_mode():
            fn()  # warm
            sync(torch)
            started = time.perf_counter()
            for _ in range(reps):
                out = fn()
            sync(torch)
        return (time.perf_counter() - started) / reps / pages * 1000, out

    def tower() -> tuple[float, object]:
        ms, out = timed(lambda: visual(pixels, grid_thw=grid))
        return ms, (out if torch.is_tensor(out) else out.pooler_output).float()

    restore_window_attention(model)
    patch_embed.restore(model)
    library_ms, expected = tower()
    conv_ms, _ = timed(lambda: visual.patch_embed(pixels))
    batch_window_attention(model)
    patch_embed.use_linear(model)
    batched_ms, got = tower()
    linear_ms, _ = timed(lambda: visual.patch_embed(pixels))
    check = engine.vision_checks[0] if engine.vision_checks else {}
    out = {"pages": pages, "library_ms_per_page": round(library_ms, 1), "batched_ms_per_page": round(batched_ms, 1),
           "speedup": round(library_ms / batched_ms, 2), "relative_error": relative_error(got, expected),
           "patch_embed": {"conv3d_ms_per_page": round(conv_ms, 2), "linear_ms_per_page": round(linear_ms, 2)},
           "engine_uses": engine.vision_checks}
    if check.get("varlen"):  # FlashAttention's varlen kernel passed its check: its windows as they lie, too
        batch_window_attention(model, varlen=True)
        varlen_ms, got = tower()
        out.update(varlen_ms_per_page=round(varlen_ms, 1), varlen_speedup=round(library_ms / varlen_ms, 2),
                   varlen_relative_error=relative_error(got, expected))
    elif not check.get("batched"):  # back to what the engine's own start-up checks kept
        restore_window_attention(model)
    if not check.get("patch_embed", {}).get("linear"):
        patch_embed.restore(model)
    return out


def mismatches(torch, engine, pages, new_tokens: int) -> dict:
    """The fast path against plain `generate` on the same pages, token for token (EOS as the model says).

    At each page's first divergence, the reference's logit margin (top-1 minus top-2): a margin near
    zero is kernel noise choosing between two near-equal tokens; a wide one would be a bug."""
    scheduler = engine.schedulers[0]
    eos = engine.model.generation_config.eos_token_id
    scheduler.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    rows = []
    for page in pages:
        request = requests_for(engine, [page], [new_tokens])[0]
        scheduler.submit(request)
        request.done.wait()
        inputs = engine.processor(text=[engine.prompt], images=[page], return_tensors="pt").to(engine.model.device)
        with torch.inference_mode():
            out = engine.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                        output_scores=True, return_dict_in_generate=True)
        ref = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        ref = ref[:ref.index(eos)] if eos in ref else ref
        first = next((i for i, (a, b) in enumerate(zip(ref, request.tokens)) if a != b), None)
        if first is None and len(ref) != len(request.tokens):
            first = min(len(ref), len(request.tokens))
        margin = None
        if first is not None and first < len(out.scores):
            top = out.scores[first][0].float().topk(2).values
            margin = round(float(top[0] - top[1]), 4)
        mismatched = sum(a != b for a, b in zip(ref, request.tokens)) + abs(len(ref) - len(request.tokens))
        rows.append({"tokens": len(ref), "identical": first is None, "first_mismatch": first,
                     "mismatched_tokens": mismatched, "margin_at_first_mismatch": margin,
                     "error": repr(request.error) if request.error else None})
    return {"pages": len(rows), "identical_pages": sum(r["identical"] for r in rows),
            "mismatched_tokens": sum(r["mismatched_tokens"] for r in rows), "rows": rows}


def float32_mismatches(torch, path: str, pages, new_tokens: int) -> dict:
    """The same comparison in float32 with TF32 off: no kernel noise to hide behind, so zero mismatches."""
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    engine = NanonetsEngine(path, model_id="fp32 check", revision="0" * 40, max_new_tokens=new_tokens,
                            repetition_window=0, devices=["auto"], max_side=1280, batch_size=len(pages),
                            dtype="float32", prefill_concurrent=os.environ.get("OCR_PREFILL_CONCURRENT", "auto"))
    try:
        return {"dtype": "float32", "tf32": False, "checks": engine.checks,
                **mismatches(torch, engine, pages, new_tokens)}
    finally:
        engine.close()
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
