"""The service's own NanonetsEngine on the full Nanonets-OCR-s architecture, on a GPU.

`gpu_throughput.py` times `generate` on hand-built inputs; this runs the engine exactly as a worker
does: a checkpoint saved to disk (random Qwen2.5-VL-3B weights, bf16, a tokenizer with the real
vocabulary size and special-token ids, Qwen2.5-VL's processor classes and chat template), loaded from
the snapshot path, pages through the processor and the model card's prompt, greedy decoding. It
compares recognising pages one per call with GNOSIS_PAGES_PER_TASK-style batches. Run only where
CUDA exists:

    python bench/gpu_engine.py [--pages 8] [--new-tokens 128] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.gpu_throughput import a4_page, build_model  # noqa: E402

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # ids 151643..151656


def save_checkpoint(model, out: str, *, small: bool = False) -> str:
    """The model plus a processor whose tokenizer has Qwen2's special tokens at Qwen2's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    from tests.tinymodel import QWEN2_VL_CHAT_TEMPLATE

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
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    model.generation_config.eos_token_id = 151645
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("CUDA is not available: this benchmark runs only on a GPU machine.")
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    result = {"bench": "gpu_engine", "gpu": torch.cuda.get_device_name(0), "pages": args.pages,
              "new_tokens": args.new_tokens}
    started = time.perf_counter()
    model = build_model(torch)
    path = save_checkpoint(model, tempfile.mkdtemp(prefix="nanonets-random-"))
    del model
    torch.cuda.empty_cache()
    result["save_s"] = round(time.perf_counter() - started, 1)
    result["checkpoint_gb"] = round(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e9, 2)

    started = time.perf_counter()
    engine = NanonetsEngine(path, model_id="nanonets/Nanonets-OCR-s (random weights)", revision="0" * 40,
                            device="cuda", max_new_tokens=args.new_tokens)
    torch.cuda.synchronize()
    result["load_s"] = round(time.perf_counter() - started, 1)
    engine.model.generation_config.min_new_tokens = args.new_tokens  # equal work per page
    pages = [a4_page(1280) for _ in range(args.pages)]
    engine.recognize(pages[:1])  # warm-up

    rows = []
    for batch in (1, args.pages):
        torch.cuda.synchronize()
        started = time.perf_counter()
        texts = [t for i in range(0, len(pages), batch) for t in engine.recognize(pages[i:i + batch])]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        assert len(texts) == len(pages)
        rows.append({"pages_per_call": batch, "seconds": round(seconds, 2), "pages_per_s": round(len(pages) / seconds, 3)})
        print(f"pages per call {batch}: {rows[-1]}", file=sys.stderr, flush=True)
    result["rows"] = rows
    result["speedup"] = round(rows[1]["pages_per_s"] / rows[0]["pages_per_s"], 2)
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
