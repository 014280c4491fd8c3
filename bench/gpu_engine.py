"""The batched NanonetsEngine on the full Nanonets-OCR-s architecture, alone and through the service.

One command on a CUDA machine (about 6-7 minutes on an H100/H200) measures issue 9's numbers:

- the engine alone: a checkpoint saved to disk (random Qwen2.5-VL-3B weights, bf16, a tokenizer with
  the real vocabulary size and special-token ids, Qwen2.5-VL's processor and chat template), loaded
  from its snapshot path; 1280-px A4 pages through the processor and the model card's prompt; output
  lengths forced to a fixed mix (mean ~1,083 tokens) by stopping each page at its length as if it had
  written EOS. Pages/s, output tokens/s, ms per decode step, peak memory and graph captures after
  warm-up at B = 1, 8, 32 and the default B; single-page latency at 1,100 tokens; token mismatches
  against plain `generate` on a few pages;
- the whole service: Redis, the API under gunicorn, a worker with the engine loading the model through
  the shared-cache code from a local stand-in hub, 64 one-page jobs from 8 clients at once.

    python bench/gpu_engine.py --out docs/results/gpu_engine_h200.json
    python bench/gpu_engine.py --tiny --out /tmp/tiny.json     # the same script on a CPU, tiny model

Results are written after every section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.gpu_throughput import a4_page, build_model  # noqa: E402

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # ids 151643..151656
MIX = [300, 600, 900, 1100, 1400, 2200]
"""Output tokens per page, cycled: mean 1,083, near the 1,100 of a typical page."""


def save_checkpoint(model, out: str, *, small: bool = False) -> str:
    """The model plus a processor whose tokenizer has Qwen2's special tokens at Qwen2's ids."""
    processor = build_processor(small=small)
    model.generation_config.eos_token_id = 151645
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(out, max_shard_size="1GB")  # shards download in parallel
    processor.save_pretrained(out)
    return out


def build_processor(*, small: bool = False):
    """Qwen2.5-VL's processor and chat template with a tokenizer that has Qwen2's special tokens at
    Qwen2's ids (a word-level vocabulary of the real size: enough for the engine, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from harness.tinymodel import QWEN2_VL_CHAT_TEMPLATE

    first_special = 151643
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, first_special)}}
    vocab.update({token: first_special + n for n, token in enumerate(QWEN_SPECIAL)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]", additional_special_tokens=QWEN_SPECIAL[1:])
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    size = {"shortest_edge": 3136, "longest_edge": 200_000 if small else 12845056}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)


class Report:
    def __init__(self, path: str | None, **fields) -> None:
        self.path = path
        self.data = {"bench": "gpu_engine", **fields}

    def section(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            self.data[name] = fn(*args, **kwargs)
        except Exception as exc:  # report and go on: one failed section must not lose the others
            traceback.print_exc()
            self.data[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        self.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
        print(f"   {name}: {json.dumps(self.data[name])[:600]}", file=sys.stderr, flush=True)
        self.save()
        return self.data[name]

    def save(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1)


def checkpoint(torch, tiny: bool) -> str:
    out = tempfile.mkdtemp(prefix="nanonets-random-")
    if tiny:
        from harness.tinymodel import build_tiny_model

        return str(build_tiny_model(out))
    model = build_model(torch)
    save_checkpoint(model, out)
    del model
    torch.cuda.empty_cache()
    return out


def forced(scheduler) -> None:
    """Pages stop at their forced length only: random weights must not end them early."""
    scheduler.eos_ids = set()


def requests_for(engine, pages, lengths):
    return [engine._request(page, max_new_tokens=n) for page, n in zip(pages, lengths, strict=True)]


def mixed_requests(engine, page, count: int):
    """`count` copies of `page` whose forced lengths go round the mix."""
    return requests_for(engine, [page] * count, [MIX[i % len(MIX)] for i in range(count)])


def run_batch(torch, engine, scheduler, requests) -> dict:
    sync(torch)
    before = (scheduler.steps, scheduler.tokens, scheduler.step_seconds, scheduler.prefill_seconds,
              scheduler.decoder.captures)
    started = time.perf_counter()
    for request in requests:
        scheduler.submit(request)
    for request in requests:
        request.done.wait()
    sync(torch)
    seconds = time.perf_counter() - started
    errors = [repr(r.error) for r in requests if r.error is not None]
    tokens = sum(len(r.tokens) for r in requests)
    steps = scheduler.steps - before[0]
    return {"slots": scheduler.capacity, "pages": len(requests), "seconds": round(seconds, 2),
            "pages_per_s": round(len(requests) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "output_tokens": tokens, "steps": steps,
            "mean_batch": round((scheduler.tokens - before[1]) / max(steps, 1), 1),
            "ms_per_step": round(1000 * (scheduler.step_seconds - before[2]) / max(steps, 1), 2),
            "prefill_s": round(scheduler.prefill_seconds - before[3], 2),
            "prefill_ms_per_page": round(1000 * (scheduler.prefill_seconds - before[3]) / len(requests), 1),
            "captures_during_run": scheduler.decoder.captures - before[4],
            "errors": errors[:3]}


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib(torch) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def scheduler_for(engine, slots: int):
    """Another decoder and scheduler of `slots` on the engine's model (the default one is left as is)."""
    from gnosis_ocr.worker.engines.decoder import StaticDecoder
    from gnosis_ocr.worker.engines.scheduler import Scheduler

    default = engine.schedulers[0]
    decoder = StaticDecoder(engine.model, slots=slots, max_len=engine.max_len, graphs=default.decoder.use_graphs,
                            attention_mode=default.decoder.attention)
    started = time.perf_counter()
    captured = decoder.warm_up()
    scheduler = Scheduler(decoder, eos_ids=set(), prefill_batch=default.prefill_batch, gather=default.gather,
                          concurrent=default.concurrent).start()
    return scheduler, {"captures": captured, "capture_s": round(time.perf_counter() - started, 1)}


def engine_alone(torch, engine, page, batches: list[int], pages_per_slot: int) -> dict:
    default = engine.schedulers[0]
    forced(default)
    rows = []
    for slots in batches:
        if slots == default.capacity:
            scheduler, warm = default, {"captures": 0, "capture_s": 0}
        else:
            try:  # a batch bigger than the card holds beside the default one costs its row, not the others
                scheduler, warm = scheduler_for(engine, slots)
            except Exception as exc:
                rows.append({"batch": slots, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"   B={slots}: {rows[-1]}", file=sys.stderr, flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
        requests = mixed_requests(engine, page, max(len(MIX), pages_per_slot * slots))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        row = {"batch": slots, "default": scheduler is default, **warm, **run_batch(torch, engine, scheduler, requests),
               "peak_gib": peak_gib(torch)}
        row["prefill"] = "concurrent" if scheduler.concurrent else "serial"
        rows.append(row)
        print(f"   B={slots}: {row}", file=sys.stderr, flush=True)
        if scheduler is not default:
            scheduler.stop()
            del scheduler
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if default.concurrent:  # the same batch with prefills on the loop's thread: what running them beside buys
        prefiller, default._prefiller = default._prefiller, None  # idle now: nothing is being prefilled
        try:
            requests = mixed_requests(engine, page, max(len(MIX), pages_per_slot * default.capacity))
            rows.append({"batch": default.capacity, "default": True, "prefill": "serial",
                         **run_batch(torch, engine, default, requests)})
            print(f"   B={default.capacity} serial prefills: {rows[-1]}", file=sys.stderr, flush=True)
        finally:
            default._prefiller = prefiller
    return {"rows": rows}


def single_page(torch, engine, page, tokens: int) -> dict:
    scheduler = engine.schedulers[0]
    forced(scheduler)
    request = requests_for(engine, [page], [tokens])[0]
    row = run_batch(torch, engine, scheduler, [request])
    return {"tokens": tokens, "seconds": row["seconds"],
            "first_token_s": round(request.first_token - request.submitted, 3),
            "ms_per_step": row["ms_per_step"], "prefill_ms": row["prefill_ms_per_page"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device: checks the script")
    parser.add_argument("--batches", default="1,8,32,64", help="batch sizes besides the default one")
    parser.add_argument("--pages-per-slot", type=int, default=2)
    parser.add_argument("--compare-pages", type=int, default=3)
    parser.add_argument("--compare-tokens", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--fp32-pages", type=int, default=3)
    parser.add_argument("--fp32-tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--service-batches", default="0",
                        help="slots per GPU for the service section, one run each (0: the engine sizes it)")
    parser.add_argument("--sections",
                        default="vision,single_page,engine_alone,mismatches,kernels,decode_attention,float32_mismatches,service",
                        help="which sections to run: a whole run takes longer than one 10-minute device call")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    import transformers

    wanted = set(args.sections.split(","))
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("CUDA is not available: run with --tiny to check the script on a CPU.")
    if args.tiny and not torch.cuda.is_available():
        reference_flash()
    report = Report(args.out, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    torch=torch.__version__, transformers=transformers.__version__, mix=MIX)
    started = time.perf_counter()
    path = checkpoint(torch, args.tiny)
    report.data["checkpoint_s"] = round(time.perf_counter() - started, 1)
    compare = [a4_page(160 if args.tiny else 1280)] + [_other_page(i, args.tiny) for i in range(args.compare_pages - 1)]
    concurrent = os.environ.get("OCR_PREFILL_CONCURRENT", "auto")
    from bench.gpu_checks import float32_mismatches, mismatches, vision

    if wanted & {"vision", "single_page", "engine_alone", "mismatches", "kernels", "decode_attention"}:
        from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

        started = time.perf_counter()
        def load(graphs=None):
            return NanonetsEngine(path, model_id="nanonets/Nanonets-OCR-s (random weights)", revision="0" * 40,
                                  max_new_tokens=max(MIX), repetition_window=0, devices=["auto"], max_side=1280,
                                  graphs=graphs, prefill_concurrent=concurrent)

        try:
            engine = load()
        except Exception as exc:  # measure the eager decode rather than nothing, and say why
            traceback.print_exc()
            report.data["graphs_error"] = f"{type(exc).__name__}: {exc}"[:500]
            engine = load(graphs=False)
        sync(torch)
        default = engine.schedulers[0]
        report.data["engine"] = {"device": str(default.decoder.device), "default_batch": default.capacity,
                                 "max_len": default.decoder.max_len,
                                 "load_and_warm_s": round(time.perf_counter() - started, 1),
                                 "captures_at_warm_up": engine.captures,
                                 "batch_buckets": default.decoder.batch_buckets,
                                 "len_buckets": default.decoder.len_buckets,
                                 "graph_vs_eager": engine.checks, "vision_attention": engine.vision_checks,
                                 "decode_attention": engine.attention_checks, "paths": engine.attention_paths,
                                 "norm": [f"{s.decoder.rms_path}: {s.decoder.rms_reason}" for s in engine.schedulers],
                                 "projections": [s.decoder.stacked_reason for s in engine.schedulers],
                                 "prefill_stream": [s.stream_check for s in engine.schedulers]}
        report.save()
        page = a4_page(160 if args.tiny else 1280)
        probe = engine._request(page)
        report.data["engine"]["prompt_tokens"] = probe.length
        report.data["engine"]["image_tokens"] = int(probe.inputs["image_grid_thw"][0].prod()) // 4
        batches = sorted({int(b) for b in args.batches.split(",")} | {default.capacity})
        if "vision" in wanted:
            report.section("vision", vision, torch, engine, page, default.prefill_batch)
        if "single_page" in wanted:
            report.section("single_page", single_page, torch, engine, page, 1100)
        if "engine_alone" in wanted:
            report.section("engine_alone", engine_alone, torch, engine, page, batches, args.pages_per_slot)
        report.data["captures_after_warm_up"] = engine.captures - report.data["engine"]["captures_at_warm_up"]
        if "mismatches" in wanted:
            report.section("mismatches", mismatches, torch, engine, compare, args.compare_tokens)
        if "kernels" in wanted:
            from bench.step_kernels import kernels

            report.section("kernels", kernels, torch, engine, [1, 16, default.capacity], page=page)
        if "decode_attention" in wanted:
            from bench.step_kernels import decode_attention

            report.section("decode_attention", decode_attention, torch, engine, [1, 16, 64, default.capacity],
                           probe.length)
        engine.close()
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.fp32_pages and "float32_mismatches" in wanted:
        report.section("float32_mismatches", float32_mismatches, torch, path, compare[:args.fp32_pages],
                       args.fp32_tokens)
    if not args.skip_service and "service" in wanted:
        from bench.gpu_service import service

        for n, batch in enumerate(int(b) for b in args.service_batches.split(",")):
            report.section("service" if n == 0 else f"service_b{batch}", service, path, jobs=args.jobs,
                           clients=args.clients, tiny=args.tiny, batch=batch)
    print(json.dumps(report.data))
    summary(report.data)


def reference_flash() -> None:
    """On a CPU, the decode attention's `flash` path through a reference of FlashAttention's contract
    (`harness/flashref.py`), and the RMSNorm through `F.rms_norm` as on CUDA (where it is one fused kernel),
    so that the dry run goes through every line the GPU run will."""
    from gnosis_ocr.worker.engines import attention, norm
    from harness import flashref

    attention.unavailable = lambda *args: None
    attention.varlen = flashref.varlen
    norm.has_fused_kernel = lambda device: True
    # Prefills beside the decode steps, as OCR_PREFILL_CONCURRENT=auto runs them on a GPU.
    os.environ["OCR_PREFILL_CONCURRENT"] = "on"


def _other_page(i: int, tiny: bool):
    """Pages of other shapes and content than the A4 one: a letter and a receipt-like strip."""
    from PIL import Image, ImageDraw

    size = [(1280, 960), (480, 1280)][i % 2] if not tiny else [(160, 120), (60, 160)][i % 2]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for n, y in enumerate(range(10, size[1] - 10, max(size[1] // 30, 8))):
        draw.text((10, y), f"{n} item {n * 7 % 13} total {n * 3.5:.2f}", fill="black")
    return img


def summary(data: dict) -> None:
    print(f"\n{data['gpu']}, torch {data['torch']}, transformers {data['transformers']}, mix {data['mix']}")
    engine = data.get("engine", {})
    print(f"default batch {engine.get('default_batch')}, prompt {engine.get('prompt_tokens')} tokens, "
          f"captures at warm-up {engine.get('captures_at_warm_up')}, after {data.get('captures_after_warm_up')}")
    rows = data.get("engine_alone", {}).get("rows", [])
    print(f"{'B':>4} {'prefill':>10} {'pages':>6} {'pages/s':>8} {'tok/s':>8} {'ms/step':>8} {'mean B':>7} "
          f"{'prefill ms/page':>16} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:>4} {r['error']}")
            continue
        print(f"{r['batch']:>4} {r.get('prefill', '-'):>10} {r['pages']:>6} {r['pages_per_s']:>8} "
              f"{r['tokens_per_s']:>8} {r['ms_per_step']:>8} {r['mean_batch']:>7} {r['prefill_ms_per_page']:>16} "
              f"{r.get('peak_gib')!s:>9}")
    print("prefill stream check:", engine.get("prefill_stream"))
    print("vision tower (the library's per window and Conv3d vs one call per layer and a GEMM):", data.get("vision"))
    print("single page:", data.get("single_page"))
    print("graph replay vs eager:", engine.get("graph_vs_eager"))
    for row in data.get("kernels", {}).get("rows", []):
        print(f"decode step of {row['batch']}: {row['kernels']} kernels, {row['kernel_us']} µs of them "
              f"({row['us_per_kernel']} µs each), {row['step_ms']} ms replayed")
    print("prefills:", data.get("kernels", {}).get("prefills"))
    print("decode attention:", engine.get("decode_attention"))
    for row in data.get("decode_attention", {}).get("rows", []):
        print(f"  step of {row['batch']} at bucket {row['length_bucket']} (mean length {row['mean_length']}): "
              f"sdpa {row['sdpa_ms']} ms, flash {row.get('flash_ms', '-')} ms")
    print("mismatches (bf16):", {k: v for k, v in data.get("mismatches", {}).items() if k != "rows"},
          [r.get("margin_at_first_mismatch") for r in data.get("mismatches", {}).get("rows", [])])
    print("mismatches (float32, TF32 off):",
          {k: v for k, v in data.get("float32_mismatches", {}).items() if k not in ("rows", "checks")})
    for name in [k for k in data if k == "service" or k.startswith("service_b")]:
        print(f"{name}:", data[name])


if __name__ == "__main__":
    main()
