"""Nanonets-OCR-s (a Qwen2.5-VL-3B fine-tune) through transformers, loaded offline from a snapshot path.

One model, decoder and scheduler per device. Worker threads call `recognize` for single pages of
any job: each prepares its page on the CPU (processor, tokenizer), hands it to the least busy
device's scheduler, and waits while that device decodes every page in flight together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ... import defaults
from ...errors import EngineDead, EngineDeadWithoutPage
from . import PageText, PageTimings, patch_embed, vision
from .decoder import StaticDecoder
from .prompt import PagePrompt
from .repetition import RepetitionGuard
from .request import Request
from .scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_AUTO_BATCH = 128
"""Largest batch chosen from free memory when none is configured. A decode step reads every weight once
whatever the batch, so it grows slowly with it (7.05 ms for 1 page, 8.87 ms for 64 on an H200): 128
pages should decode about 1.65 times the tokens per second of 64 (twice the pages for about 1.2 times
the step, extrapolated; `bench/gpu_engine.py` measures both). At about 0.24 GB of cache a slot
(Qwen2.5-VL-3B, 6,400 tokens), 128 slots take 30 GB; smaller cards get fewer, from what their memory
holds after the measured prefill."""

PREFILL_RESERVE_BYTES = 6 * 2**30
"""GPU memory kept free for a prefill's activations (vision tower and prompt) when sizing the batch."""


class NanonetsEngine:
    batched = True
    render_dpi = None
    render_grayscale = False

    def __init__(self, path: str | Path, *, model_id: str, revision: str, devices: Sequence[str] = ("auto",),
                 max_new_tokens: int = 4096, threads: int = 0, batch_size: int = 0, max_side: int = 1280,
                 prefill_batch: int = 4, prefill_gather: float = defaults.DEFAULT_PREFILL_GATHER_MS / 1000,
                 prefill_concurrent: str = defaults.DEFAULT_PREFILL_CONCURRENT,
                 repetition_window: int = 512, graphs: bool | None = None,
                 on_work: Callable[[str, str, int, float], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None,
                 stall_grace: float = defaults.ENGINE_STALL_GRACE, dtype: str | None = None,
                 vision_attention: str = "batched", decode_attention: str = "flash") -> None:
        import torch
        from transformers import AutoProcessor

        self.model_id = model_id
        self.model_revision = revision
        self.max_new_tokens = max_new_tokens
        self.stall_grace = stall_grace
        self.on_dead = on_dead
        resolved = resolve_devices(devices)
        if threads > 0 and resolved[0].type == "cpu":
            torch.set_num_threads(threads)
        # A path, never a repo id: with HF_HUB_OFFLINE=1 this sends no request at all.
        self.processor = AutoProcessor.from_pretrained(str(path))
        self.tokenizer = self.processor.tokenizer
        self.page_prompt = PagePrompt(self.processor)
        self.prompt = self.page_prompt.text
        from PIL import Image

        probe = Image.new("RGB", (max_side // 2, max_side), "white")
        # Pages' inputs are built from the image grid, off any lock; only if that ever differs from the
        # processor's output (another processor release) does each page go through the processor.
        self.fast_prompt = self.page_prompt.matches_processor(probe)
        if not self.fast_prompt:
            log.warning("the prompt built from the image grid differs from the processor's; using the processor")
        self.longest_prompt = self._prompt_tokens(max_side)
        self.max_len = self.longest_prompt + max_new_tokens + 1
        self.models, self.schedulers = [], []
        self.vision_checks: list[dict] = []
        for device in resolved:
            model = load_model(path, device, dtype)
            if vision_attention == "batched":
                self._batch_vision(model, max_side)
            concurrent = prefill_concurrent == "on" or (prefill_concurrent == "auto" and device.type == "cuda")
            slots = batch_size or auto_batch(model, device, self.max_len,
                                             reserve=self._reserve(model, max_side, prefill_batch, concurrent))
            decoder = StaticDecoder(model, slots=slots, max_len=self.max_len, graphs=graphs,
                                    attention_mode=decode_attention)
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
            hook = (lambda phase, pages, seconds, d=str(device): on_work(d, phase, pages, seconds)) if on_work else None
            guard = RepetitionGuard(repetition_window, max_tokens=max_new_tokens) if repetition_window > 0 else None
            scheduler = Scheduler(decoder, eos_ids=eos_ids, prefill_batch=prefill_batch, gather=prefill_gather,
                                  guard=guard, on_work=hook, on_dead=self._dead, name=f"engine-{device}",
                                  concurrent=concurrent)
            self.models.append(model)
            self.schedulers.append(scheduler)
            log.info("loaded %s@%s on %s (%s): %d slots of %d tokens, %s decode attention", model_id, revision[:12],
                     device, model.dtype, slots, decoder.max_len, decoder.attention)
        self.warm_up(max_side)
        for scheduler in self.schedulers:
            scheduler.start()

    def _reserve(self, model, max_side: int, pages: int, concurrent: bool) -> int:
        """GPU memory kept free beside the cache: the worst prefill, and where prefills run beside the steps,
        the keys and values of up to a chunk less one of prefilled pages waiting for slots meanwhile."""
        waiting = (pages - 1) * StaticDecoder.slot_bytes(model, self.longest_prompt) if concurrent else 0
        return self._prefill_bytes(model, max_side, pages) + waiting

    def _prefill_bytes(self, model, max_side: int, pages: int) -> int:
        """GPU memory the worst prefill takes (`pages` square pages at the largest side, the most tokens a
        page makes), measured once on this device before the cache is sized; the fixed reserve where it
        cannot be measured (the CPU, or the measurement failing)."""
        import torch
        from PIL import Image

        if model.device.type != "cuda":
            return PREFILL_RESERVE_BYTES
        try:
            page = Image.effect_noise((max_side, max_side), 64).convert("RGB")
            one = self.page_prompt.reference(page)
            inputs = {k: (torch.cat([v] * pages) if hasattr(v, "shape") else v) for k, v in one.items()}
            inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.cuda.device(model.device), torch.inference_mode():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                model(**inputs, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
            torch.cuda.empty_cache()
        except Exception as exc:  # sizing must not stop the worker: the fixed reserve is safe
            log.warning("could not measure a prefill's memory on %s (%s); reserving %.1f GiB", model.device, exc,
                        PREFILL_RESERVE_BYTES / 2**30)
            return PREFILL_RESERVE_BYTES
        reserve = int(peak * 1.25) + 2**30  # headroom for allocator fragmentation and the decode graphs
        log.info("a prefill of %d page(s) at %d px takes %.2f GiB on %s; reserving %.2f GiB", pages, max_side,
                 peak / 2**30, model.device, reserve / 2**30)
        return reserve

    def _batch_vision(self, model, max_side: int) -> None:
        """The vision tower's fast paths, each kept only if this device's output matches the library's on a
        page of noise (a blank page would hide a wrong mask: every window would look alike): the patch
        embedding as one GEMM (`patch_embed.py`), and one attention call per layer (`vision.py`)."""
        from PIL import Image

        probe = Image.effect_noise((max_side // 2, max_side), 64).convert("RGB")
        inputs = self.page_prompt.inputs(probe) if self.fast_prompt else self.page_prompt.reference(probe)
        embed = patch_embed.check(model, inputs["pixel_values"])
        check = vision.choose(model, inputs["pixel_values"], inputs["image_grid_thw"])
        self.vision_checks.append({"device": str(model.device), **check, "patch_embed": embed})
        path = ("one varlen FlashAttention call per layer" if check["varlen"] else
                "one padded SDPA call per layer" if check["batched"] else "per window")
        log.info("vision tower on %s: attention %s (%s), patch embedding %s", model.device, path,
                 f"relative error {check['relative_error']:.1e} against the library's" if "relative_error" in check
                 else check.get("reason"), "as one GEMM" if embed["linear"] else "as the library's Conv3d")

    @property
    def model(self):
        return self.models[0]

    @property
    def slots(self) -> int:
        """Pages decoded at once across every device."""
        return sum(s.capacity for s in self.schedulers)

    @property
    def devices(self) -> dict[str, int]:
        return {str(s.decoder.device): s.capacity for s in self.schedulers}

    @property
    def dead(self) -> EngineDead | None:
        """Why the engine can no longer serve (a device's loop died), or None while it can."""
        return next((s.dead for s in self.schedulers if s.dead is not None), None)

    @property
    def attention_paths(self) -> dict[str, dict[str, str]]:
        """Per device, the paths its start-up checks kept: what `gnosis_worker_device_info` says."""
        towers = {c["device"]: c for c in self.vision_checks}

        def paths(device: str) -> dict[str, str]:
            check = towers.get(device, {})
            return {"vision_attention": "varlen" if check.get("varlen") else "batched" if check.get("batched")
                    else "windows",
                    "patch_embed": "linear" if check.get("patch_embed", {}).get("linear") else "conv3d"}
        return {str(s.decoder.device): {"decode_attention": s.decoder.attention, **paths(str(s.decoder.device)),
                                        "projections": "stacked" if s.decoder.stacked is not None else "apart",
                                        "norm": s.decoder.rms_path,
                                        "prefill": "concurrent" if s.concurrent else "serial"}
                for s in self.schedulers}

    @property
    def attention_checks(self) -> list[dict]:
        """Each device's decode attention, and why (`attention.choose`)."""
        return [{"device": str(s.decoder.device), **s.decoder.attention_check} for s in self.schedulers]

    @property
    def checks(self) -> list[dict]:
        """Each device's start-up check: its decode graph replayed against the eager step."""
        return [s.check for s in self.schedulers if s.check is not None]

    def warm_up(self, max_side: int) -> None:
        """Capture every decode graph, check a replay against the eager step and run one page per device,
        each under its own device, before the worker reports ready."""
        from PIL import Image

        started = time.monotonic()
        page = Image.new("RGB", (max_side // 2, max_side), "white")
        for scheduler in self.schedulers:
            graphs = scheduler.warm_up(self._request(page, max_new_tokens=4))
            log.info("engine on %s warm in %.1fs (%d decode graphs; replay identical to eager: %s; prefills %s)",
                     scheduler.decoder.device, time.monotonic() - started, graphs,
                     (scheduler.check or {}).get("identical"),
                     "beside the steps" if scheduler.concurrent else "on the loop's thread")

    def _dead(self, error: BaseException) -> None:
        # One device gone takes the process down: its CUDA context cannot be trusted or reset in place.
        for scheduler in self.schedulers:
            if scheduler.dead is None:
                scheduler.kill(error if isinstance(error, EngineDead) else EngineDead(str(error)))
        if self.on_dead is not None:
            self.on_dead(error)

    @property
    def captures(self) -> int:
        return sum(s.decoder.captures for s in self.schedulers)

    def recognize(self, page, *, deadline: float | None = None, cancelled: Callable[[], bool] | None = None,
                  language: str | None = None, deaths: int = 0) -> PageText:
        """The page's text. Never waits without a limit: a loop that has not answered `stall_grace`
        seconds past the deadline is declared stuck (EngineDead, and the page goes back to the queue).
        `deaths`: engine deaths the page was on a device for (a suspect shares its device with few others,
        or runs alone: `admission.py`)."""
        if self.dead is not None:
            raise EngineDeadWithoutPage(self.dead.message)
        request = self._request(page)
        request.deaths = deaths
        request.deadline = deadline if deadline is not None else (
            time.monotonic() + defaults.DEFAULT_PAGE_SOFT_TIMEOUT)
        live = [s for s in self.schedulers if s.alive]
        if not live:
            raise EngineDeadWithoutPage(self.dead.message if self.dead else "The engine has no live device.")
        scheduler = min(live, key=lambda s: s.load() / s.capacity)
        scheduler.submit(request)
        give_up = request.deadline + self.stall_grace
        try:
            while not request.done.wait(0.25):
                if cancelled is not None and _asks_to_cancel(cancelled):
                    request.cancel()
                if time.monotonic() > give_up:
                    scheduler.stalled(f"a page waited {self.stall_grace:.0f}s past its deadline")
                elif not scheduler.alive:
                    scheduler.stalled("its loop thread is gone")
        finally:
            if not request.done.is_set():  # this thread is leaving (a soft time limit, say): so does the page
                request.cancel()
        if request.error is not None:
            raise request.error
        text = self.page_prompt.decode(request.tokens)
        return PageText(text=text, truncated=request.truncated, stop_reason=request.stop_reason,
                        tokens=len(request.tokens),
                        timings=PageTimings(queue_seconds=request.admitted - request.submitted,
                                            first_token_seconds=request.first_token - request.submitted))

    def _request(self, page, *, max_new_tokens: int | None = None) -> Request:
        import torch

        prompt = self.page_prompt
        inputs = prompt.inputs(page) if self.fast_prompt else prompt.reference(page)
        dtype = self.models[0].dtype
        if dtype != torch.float32:  # halve what crosses to the device, off the engine's thread
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return Request(inputs, length=inputs["input_ids"].shape[1],
                       max_new_tokens=max_new_tokens or self.max_new_tokens)

    def _prompt_tokens(self, max_side: int) -> int:
        """The longest prompt a page can make: a square page at the largest side the service renders."""
        from PIL import Image

        return int(self.page_prompt.reference(Image.new("RGB", (max_side, max_side), "white"))["input_ids"].shape[1])

    def close(self) -> None:
        for scheduler in self.schedulers:
            scheduler.stop()


def _asks_to_cancel(cancelled: Callable[[], bool]) -> bool:
    """`cancelled()` reads Redis: an error there is no reason to decode on to the token cap unseen, nor to
    abandon the page; ask again at the next poll."""
    try:
        return bool(cancelled())
    except Exception as exc:
        log.warning("could not check whether the page's job was cancelled: %s", exc)
        return False


def resolve_devices(devices: Sequence[str]):
    """`auto` is every visible GPU (one engine each), or the CPU where there is none."""
    import torch

    out = []
    for name in devices:
        if name == "auto":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            out += [torch.device(f"cuda:{i}") for i in range(count)] or [torch.device("cpu")]
        elif name == "cuda":
            out.append(torch.device("cuda:0"))
        else:
            out.append(torch.device(name))
    return out


def load_model(path: str | Path, device, dtype: str | None = None):
    """bf16 on a GPU, float32 on the CPU, unless `dtype` says (the benchmark's float32 check)."""
    import torch
    from transformers import AutoModelForImageTextToText

    chosen = getattr(torch, dtype) if dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=chosen).to(device).eval()


def auto_batch(model, device, max_len: int, *, reserve: int = PREFILL_RESERVE_BYTES) -> int:
    """As many slots as free GPU memory holds after a prefill's `reserve`, at most MAX_AUTO_BATCH."""
    import torch

    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    per_slot = StaticDecoder.slot_bytes(model, max_len)
    slots = int((free - reserve) // per_slot)
    if slots < 1:
        raise MemoryError(f"{free / 2**30:.1f} GiB free on {device} holds no page of {max_len} tokens")
    return min(slots, MAX_AUTO_BATCH)
