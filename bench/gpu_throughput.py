"""GPU throughput of the Nanonets-OCR-s architecture (Qwen2.5-VL-3B) with random weights, bf16.

Random weights are enough: speed depends on the shapes, not the values, and no hub is reachable on a
GPU box here. Inputs are what the service feeds the model: an A4 page rendered with its longest side
at the service's resolution (GNOSIS_PAGE_MAX_SIDE, 1280), through the same image processor class, and
a prompt of the length of the model card's. Output length is fixed (min = max new tokens) so every
batch does the same work. Prints one JSON line and a table; run only where CUDA exists:

    python bench/gpu_throughput.py [--new-tokens 512] [--batches 1,4,16] [--static-cache] [--out results.json]

Also runs the service's own NanonetsEngine on CUDA (bf16) with a tiny model built on the spot,
to check the engine path itself on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Qwen/Qwen2.5-VL-3B-Instruct's config.json, which Nanonets-OCR-s fine-tunes.
TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, sliding_window=32768,
            use_sliding_window=False, max_window_layers=70)
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2, hidden_act="silu")
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
PROMPT_TOKENS = 160  # the model card's prompt plus the chat template, tokenized, is about this long


def build_model(torch):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    try:
        config = Qwen2_5_VLConfig(text_config={**TEXT, "rope_parameters": rope}, vision_config=VISION,
                                  tie_word_embeddings=True, **IDS)
    except TypeError:  # older transformers spell it rope_scaling
        config = Qwen2_5_VLConfig(text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                                               "rope_theta": 1000000.0}, vision_config=VISION, **IDS)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def a4_page(max_side: int):
    from PIL import Image, ImageDraw, ImageFont

    width, height = round(max_side / 2 ** 0.5), max_side
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, max_side // 70))
    y = 40
    for i in range(60):
        draw.text((40, y), f"Line {i:02d}: quarterly revenue grew by {i * 3} percent in region {i % 7}", fill="black",
                  font=font)
        y += max_side // 62
    return img


def inputs_for(torch, processor, page, batch: int):
    image = processor(images=[page] * batch, return_tensors="pt")
    grid = image["image_grid_thw"]
    n_image = int(grid[0].prod().item()) // 4  # spatial_merge_size ** 2
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 150000, (PROMPT_TOKENS,), generator=gen)
    ids = torch.cat([prompt[:20], torch.tensor([IDS["vision_start_token_id"]]),
                     torch.full((n_image,), IDS["image_token_id"]), torch.tensor([IDS["vision_end_token_id"]]),
                     prompt[20:]])
    input_ids = ids.repeat(batch, 1)
    return {"input_ids": input_ids.cuda(), "attention_mask": torch.ones_like(input_ids).cuda(),
            "pixel_values": image["pixel_values"].cuda().to(torch.bfloat16), "image_grid_thw": grid.cuda()}, n_image


def run_batch(torch, model, processor, page, batch: int, gen_kwargs: dict, variant: str) -> dict:
    inputs, n_image = inputs_for(torch, processor, page, batch)
    one = {**gen_kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
    if variant != "eager-generate":  # first call compiles; time the second
        model.generate(**inputs, **{**gen_kwargs, "max_new_tokens": 16, "min_new_tokens": 16})
    torch.cuda.reset_peak_memory_stats()
    _, prefill = timed(torch, lambda: model.generate(**inputs, **one))
    out, seconds = timed(torch, lambda: model.generate(**inputs, **gen_kwargs))
    new = (out.shape[1] - inputs["input_ids"].shape[1]) * batch
    return {"variant": variant, "batch": batch, "image_tokens": n_image, "prompt_tokens": inputs["input_ids"].shape[1],
            "seconds": round(seconds, 2), "prefill_s": round(prefill, 3), "pages_per_s": round(batch / seconds, 3),
            "tokens_per_s": round(new / seconds, 1),
            "decode_ms_per_step": round(1000 * (seconds - prefill) / max(gen_kwargs["max_new_tokens"] - 1, 1), 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}


def timed(torch, fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def engine_smoke(torch) -> dict:
    """The service's NanonetsEngine, on CUDA in bf16, on a tiny model built here."""
    import tempfile

    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine
    from harness.tinymodel import build_tiny_model

    path = build_tiny_model(tempfile.mkdtemp())
    engine = NanonetsEngine(path, model_id="tiny", revision="0" * 40, device="cuda", max_new_tokens=16)
    texts = engine.recognize([a4_page(1280)] * 2)
    return {"device": str(engine.device), "dtype": str(next(engine.model.parameters()).dtype), "pages": len(texts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--max-side", type=int, default=int(os.environ.get("GNOSIS_PAGE_MAX_SIDE", "1280")))
    parser.add_argument("--out", default=None)
    parser.add_argument("--static-cache", action="store_true", help="also time a static-cache, compiled decode")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import Qwen2VLImageProcessor

    if not torch.cuda.is_available():
        sys.exit("CUDA is not available: this benchmark runs only on a GPU machine.")
    result = {"bench": "gpu_throughput", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": transformers.__version__, "new_tokens": args.new_tokens, "max_side": args.max_side}
    result["engine_smoke"] = engine_smoke(torch)

    started = time.perf_counter()
    model = build_model(torch)
    result["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    result["build_s"] = round(time.perf_counter() - started, 1)
    # Qwen2.5-VL's preprocessor_config (min 3136, max 12845056 pixels), as Nanonets-OCR-s ships it. Passed
    # explicitly: the class's own default differs between transformers releases.
    processor = Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
    page = a4_page(args.max_side)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=TEXT["pad_token_id"])

    result["attn_implementation"] = model.config._attn_implementation
    rows = []
    result["rows"] = rows
    variants = [("eager-generate", {})]
    if args.static_cache:
        # A static KV cache lets generate() compile the decode step: the same model minus Python overhead.
        variants.append(("static-cache-compiled", {"cache_implementation": "static"}))
    with torch.inference_mode():
        warm, _ = inputs_for(torch, processor, page, 1)
        model.generate(**warm, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=TEXT["pad_token_id"])
        for variant, extra in variants:
            for batch in [int(b) for b in args.batches.split(",")]:
                try:
                    rows.append(run_batch(torch, model, processor, page, batch, {**gen_kwargs, **extra}, variant))
                except Exception as exc:  # report and go on: a variant may not support this model
                    rows.append({"variant": variant, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"{variant} batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=1)
    rows[:] = [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]
    print(json.dumps(result))
    print(f"\n{result['gpu']}, {result['params_b']}B params, bf16, page {args.max_side}px, "
          f"{args.new_tokens} new tokens, transformers {result['transformers']}")
    print(f"{'variant':<22} {'batch':>5} {'img tok':>8} {'prefill s':>10} {'total s':>8} {'pages/s':>8} {'tok/s':>8} "
          f"{'ms/step':>8} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} {r['batch']:>5}  failed: {r['error']}")
            continue
        print(f"{r['variant']:<22} {r['batch']:>5} {r['image_tokens']:>8} {r['prefill_s']:>10} {r['seconds']:>8} "
              f"{r['pages_per_s']:>8} {r['tokens_per_s']:>8} {r['decode_ms_per_step']:>8} {r['peak_gib']:>9}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
