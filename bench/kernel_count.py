"""What the engine asks of a GPU per decode step and per prefill, counted on any machine.

A decode step is one CUDA graph replay, but the graph still runs one kernel per operation: at small
batches an H200's step (7.05 ms for one page, docs/benchmarks.md) is bound by how many small kernels
run one after the other, not by reading the 6 GB of weights (about 1.5 ms). A prefill is not a graph
at all: every operation is a call from Python that lets go of the GIL, and every read of a single
value (`.item()`, `.tolist()`, a boolean mask's size) waits for the device to catch up.

Counted here through the engine's own code (StaticDecoder's step; its prefill with the vision tower's
batched attention) on Qwen2.5-VL-3B's layer counts (32 vision blocks, 36 decoder layers) at tiny widths,
on the CPU: the counts do not depend on the widths or the device. Operations that only make views or
allocate are left out of the step's count (they launch nothing). The step is counted as a CUDA device runs
it, with torch's fused RMSNorm (`decode_step`), and with the library's arithmetic that a device without
that kernel runs (`decode_step_exact_norm`).

    python bench/kernel_count.py --out docs/results/kernel_count.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.gpu_engine import build_processor  # noqa: E402
from bench.gpu_throughput import a4_page  # noqa: E402

NO_KERNEL = {"view", "_unsafe_view", "transpose", "unsqueeze", "slice", "select", "expand", "as_strided", "alias", "t",
         "reshape", "permute", "squeeze", "detach", "split", "unbind", "split_with_sizes", "chunk",
         "empty", "empty_like", "empty_strided"}
"""Operations that launch no kernel: views, and allocations (uninitialised: nothing runs on the device)."""
READS = {"item", "tolist", "__bool__", "__int__", "nonzero", "__index__"}
"""Python-level calls that read a value off the device: each waits for it (boolean masks call nonzero)."""


def _flat(args) -> list:
    return [x for a in args for x in (a if isinstance(a, (tuple, list)) else (a,))]


def checkpoint(depth: int, layers: int) -> Path:
    """Qwen2.5-VL-3B's shape at tiny widths: the real processor and token ids, random weights."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from harness.tinymodel import build_tiny_model

    out = build_tiny_model(Path(tempfile.mkdtemp(prefix="kernel-count-")))
    build_processor().save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"].update(depth=depth, fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth])
    config["text_config"].update(num_hidden_layers=layers, vocab_size=151936, eos_token_id=151645)
    config["text_config"].pop("layer_types", None)
    config.update(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                  vision_end_token_id=151653)
    (out / "config.json").write_text(json.dumps(config))
    Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32, help="vision blocks (Qwen2.5-VL-3B: 32)")
    parser.add_argument("--layers", type=int, default=36, help="decoder layers (Qwen2.5-VL-3B: 36)")
    parser.add_argument("--pages", type=int, default=4,
                        help="pages recognised at once; each prefill they make (one chunk or more) is counted")
    parser.add_argument("--out")
    args = parser.parse_args()

    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from gnosis_ocr.worker.engines import decoder, norm
    from gnosis_ocr.worker.engines import prefill as prefill_module
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine

    # The step as a CUDA device runs it: torch's fused RMSNorm (one kernel), which a CPU lacks.
    norm.has_fused_kernel = lambda device: True

    class Kernels(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NO_KERNEL:
                self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    class Calls(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls, self.reads, self.rope_reads = 0, {}, {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "") or ""
            if name != "__get__":  # a property read (.shape, .device) lets go of nothing
                self.calls += 1
            # A boolean index (not a boolean tensor being indexed): its size is read off the device.
            masked = name == "__getitem__" and any(getattr(a, "dtype", None) == torch.bool for a in _flat(args[1:]))
            if name in READS or masked:
                key = "boolean_mask" if masked else name
                self.reads[key] = self.reads.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    prefills: list[dict] = []
    prefill, rope_index = decoder.StaticDecoder.prefill, prefill_module.rope_index
    counting: list[Calls] = []

    def counted(self, slots, pages):
        calls = Calls()
        counting[:] = [calls]
        with calls:
            firsts = prefill(self, slots, pages)
        prefills.append({"pages": len(slots), "calls": calls.calls, "device_reads": calls.reads,
                         "rope_index_reads": calls.rope_reads})
        return firsts

    def rope_reads_apart(model, inputs):
        # Counted apart: the engine computes rope positions from the host's copy of the token ids (since
        # 2026-12-07; before, from the device's, where each of these reads waited for the device).
        calls = counting[0]
        reads, calls.reads = calls.reads, {}
        try:
            return rope_index(model, inputs)
        finally:
            calls.rope_reads, calls.reads = calls.reads, reads

    decoder.StaticDecoder.prefill = counted
    prefill_module.rope_index = rope_reads_apart
    path = checkpoint(args.depth, args.layers)
    engine = NanonetsEngine(str(path), model_id="kernel-count", revision="0" * 40, max_new_tokens=2,
                            repetition_window=0, devices=["cpu"], max_side=1280)
    try:
        page = a4_page(1280)
        prefills.clear()  # the warm-up's
        threads = [threading.Thread(target=engine.recognize, args=(page,)) for _ in range(args.pages)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        step = engine.schedulers[0].decoder
        assert step.rms_path == "fused", step.rms_reason
        counts = {}
        for name, rms in (("decode_step", step.rms), ("decode_step_exact_norm", norm.rms_norm)):
            step.rms, kernels = rms, Kernels()
            with torch.inference_mode(), kernels:
                step._step(1, 512)
            total = sum(kernels.ops.values())
            counts[name] = {"kernels": total, "per_layer": round(total / args.layers, 1),
                            "ops": dict(sorted(kernels.ops.items(), key=lambda kv: -kv[1]))}
    finally:
        engine.close()
    report = {"bench": "kernel_count", "vision_blocks": args.depth, "decoder_layers": args.layers, **counts,
              "prefills": prefills}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
