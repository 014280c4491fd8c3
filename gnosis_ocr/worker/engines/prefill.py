"""Prefills: a chunk of waiting pages through the model's own forward, then into their slots.

Two halves, so that they can run apart. `forward` is the work: the vision tower and the prompt, some 4,600
calls from Python and tens of milliseconds of a GPU per page, and it writes nothing the decode steps read.
`StaticDecoder.seat` is the rest: each layer's keys and values copied into the slots' cache, the pages'
first tokens and rope deltas set, a fraction of a millisecond.

Run one after the other on the loop's thread, every page in flight waits for the forward: at 5 pages a
second and 60 ms a page, 30% of the device's time decodes nothing. With `OCR_PREFILL_CONCURRENT` the
forward runs on a thread of its own and, on a GPU, a CUDA stream of its own (`Prefiller`), while the
loop goes on stepping the pages already seated. Once it is done, the loop seats its pages at step
boundaries, on its own stream behind the step in flight, each as a slot frees: a full chunk is prefilled
ahead of the slots it will take (`Admission._admit_beside`), so freed slots neither wait for a prefill
nor gather for a chunk.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from ...errors import EngineDead

log = logging.getLogger(__name__)


class Prefilled:
    """A forward's result, not yet in any slot: each layer's keys and values, and each page's first token
    (`first` on the device, `firsts` on the host) and rope delta. `event` (CUDA) is recorded behind it on
    the stream that computed it."""

    __slots__ = ("deltas", "event", "first", "firsts", "layers", "n")

    def __init__(self, n: int, layers: list, first: torch.Tensor, firsts: list[int], deltas: torch.Tensor,
                 event) -> None:
        self.n, self.layers, self.first, self.firsts, self.deltas, self.event = n, layers, first, firsts, deltas, event


@torch.inference_mode()
def forward(decoder, pages: Sequence[dict], *, stream=None) -> Prefilled:
    """Prompts of equal length (processor outputs, one per page) through `decoder`'s model.

    With `stream` (a CUDA stream of the decoder's device) everything runs on it, decode steps going on
    meanwhile on the loop's (`StaticDecoder.seat` keeps what it reads from being reused too early)."""
    n = pages[0]["input_ids"].shape[1]
    if n >= decoder.max_len:
        raise ValueError(f"a prompt of {n} tokens does not fit a cache of {decoder.max_len}")
    device = decoder.device
    with decoder.device_context(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        inputs = join_prompts(list(pages), device)
        # Positions computed for these prompts and passed in: never the model's `rope_deltas` attribute,
        # which `generate` and other calls also write and a release may stop setting. Computed from the
        # host's copies of the token ids (only the pixels are joined on the device): the library reads
        # single values out of them some twenty times a chunk, and on the device each read would wait for
        # the work queued before it and leave the device idle behind it.
        positions, deltas = rope_index(decoder.model, inputs)
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(decoder.dtype)
        out = decoder.model(**inputs, position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        cache = out.cache if "cache" in out else out.past_key_values  # renamed in 5.x
        first = out.logits[:, -1].argmax(-1)
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        firsts = first.cpu().tolist()  # waits for this stream's work only, without the GIL
    layers = [_layer_kv(cache, layer) for layer in range(decoder.n_layers)]
    return Prefilled(n, layers, first, firsts, deltas.view(-1).to(torch.long), event)


def rope_index(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's 3-D rope positions of each prompt and its delta (decode position minus cache index),
    from the library's own `get_rope_index`, called with the arguments this release takes."""
    get = model.model.get_rope_index
    accepted = _parameters(get)
    names = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    return get(**{k: inputs[k] for k in names if k in inputs and k in accepted})


def join_prompts(inputs: list[dict], device) -> dict:
    """Processor outputs of equal-length prompts as one batch. The pixels are joined on `device`: four A4
    pages are 55 MB, and a copy of them on the host (7 ms here) would hold the GPU up for nothing, where
    each page crosses to the device once either way. The token ids stay on the host, where the rope
    positions are computed from them."""
    if len(inputs) == 1:
        return inputs[0]
    return {key: torch.cat([i[key].to(device) if key == "pixel_values" else i[key] for i in inputs], dim=0)
            for key in inputs[0]}


def check_stream(decoder, pages: Sequence[dict], stream) -> dict:
    """One forward on `stream` against the same forward on the caller's stream: each page's first token
    and every layer's keys and values must be bit-identical (the same kernels on the same inputs), or
    prefills stay on the loop's thread. A stream of another device, or one whose work the seat does not
    wait for, fails here instead of seating garbage."""
    own = decoder.forward(pages)
    side = decoder.forward(pages, stream=stream)
    if side.event is not None:
        side.event.synchronize()
    pairs = [(a, b) for la, lb in zip(own.layers, side.layers, strict=True) for a, b in zip(la, lb, strict=True)]
    identical = own.firsts == side.firsts and all(torch.equal(a, b) for a, b in pairs)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    return {"device": str(decoder.device), "stream": stream is not None, "identical": identical,
            "max_abs_diff": diff}


class Piece:
    """Pages prefilled together (the chunk, or one of the halves it was split into) and their rows in
    `prefilled`, if their forward ran (else `error`). Pages leave as they are seated (from the front) or
    resolved while they wait (cancelled, expired)."""

    __slots__ = ("error", "pages", "prefilled", "rows")

    def __init__(self, pages: list, prefilled: Prefilled | None = None, error: BaseException | None = None) -> None:
        self.pages, self.prefilled, self.error, self.rows = pages, prefilled, error, list(range(len(pages)))

    def drop(self, request) -> None:
        i = self.pages.index(request)
        del self.pages[i], self.rows[i]


class PrefillJob:
    """A chunk on its way through a prefill. `pages` are those not yet seated nor resolved (what an engine
    that dies must still resolve); once `done`, `pieces` say how each went, or `fatal` why none can."""

    def __init__(self, pages: list) -> None:
        self.pages = list(pages)
        self.pieces: list[Piece] = []
        self.fatal: BaseException | None = None
        self.done = False
        self.reported = False
        self.seconds = 0.0


class Prefiller:
    """Runs prefill jobs one at a time on a thread of its own, on a CUDA stream of its own on a GPU."""

    def __init__(self, decoder, run: Callable[[PrefillJob], None], on_done: Callable[[], None], *,
                 name: str) -> None:
        self.decoder = decoder
        self.stream = decoder.side_stream()
        self._run_job, self._on_done = run, on_done
        self._jobs: queue.SimpleQueue[PrefillJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"gnosis-{name}-prefill", daemon=True)

    def start(self) -> Prefiller:
        self._thread.start()
        return self

    def submit(self, job: PrefillJob) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float = 30) -> None:
        self._jobs.put(None)
        if self._thread.ident and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        bound: BaseException | None = None
        try:
            self.decoder.bind_thread()
        except BaseException as exc:  # every job then fails the engine, rather than waiting forever
            bound = exc
        while (job := self._jobs.get()) is not None:
            try:
                if bound is not None:
                    job.fatal = EngineDead(f"The prefill thread cannot use {self.decoder.device}: {bound}")
                else:
                    self._run_job(job)
            except BaseException as exc:
                job.fatal = exc
            finally:
                job.done = True
                self._on_done()


class Prefilling:
    """Mixed into `Scheduler`: it owns `decoder`, `slots`, `_limbo`, `_jobs`, `_prefiller`, `prefill_batch`,
    `failed_prefills`, `guard`, `_check_device`, `_advance`, `_resolve` and `_report`."""

    def _prefill(self, slots: list[int], chunk: list) -> None:
        """Prefill `chunk` into `slots` on the loop's thread, holding every page in flight up meanwhile
        (the warm-up, and where prefills do not run concurrently)."""
        job = self._take(chunk)
        self._compute(job)
        self._accounted = time.monotonic()  # a step that ran under the prefill is the prefill's time
        self._seat(job, list(slots))

    def _start_prefill(self, chunk: list) -> None:
        """Hand `chunk` to the prefill thread; the loop seats its pages as slots free once it is done."""
        self._prefiller.submit(self._take(chunk))

    def _take(self, chunk: list) -> PrefillJob:
        now = time.monotonic()
        for request in chunk:
            self._limbo.remove(request)
            request.admitted = request.admitted or now
        job = PrefillJob(chunk)
        self._jobs.append(job)
        return job

    def _compute(self, job: PrefillJob) -> None:
        """A job's forward passes, on whichever thread runs prefills: the chunk, retried in halves after a
        failure (smaller from then on after running out of memory), down to the page that fails alone.
        Writes nothing that the loop reads, but the job: the loop seats or fails its pages."""
        started = time.monotonic()
        try:
            self._forward(job, list(job.pages))
        except BaseException as exc:  # EngineDead from the device probe, or a failure inside the recovery
            job.fatal = exc
        job.seconds = time.monotonic() - started

    def _forward(self, job: PrefillJob, pages: list) -> None:
        try:
            prefilled = self.decoder.forward([r.inputs for r in pages], stream=self._stream)
        except Exception as exc:
            self.failed_prefills += 1
            self._check_device(exc)
            if _out_of_memory(exc):
                self.decoder.free_memory()
                if len(pages) > 1 and self.prefill_batch > len(pages) // 2:
                    self.prefill_batch = max(1, len(pages) // 2)
                    log.warning("prefill of %d pages ran out of memory: prefilling at most %d at a time from now on",
                                len(pages), self.prefill_batch)
            if len(pages) == 1:
                log.error("prefill failed for one page: %s: %s", type(exc).__name__, exc)
                job.pieces.append(Piece(pages, error=exc))
                return
            log.warning("prefill of %d pages failed (%s: %s); retrying in halves", len(pages), type(exc).__name__, exc)
            mid = len(pages) // 2
            self._forward(job, pages[:mid])
            self._forward(job, pages[mid:])
            return
        job.pieces.append(Piece(pages, prefilled))

    @property
    def _stream(self):
        return self._prefiller.stream if self._prefiller is not None else None

    def _seat(self, job: PrefillJob, free: list[int]) -> None:
        """On the loop's thread: seat a computed job's pages, in order, in the `free` slots (taking those it
        uses off the list), and fail those that failed; the job leaves `_jobs` once none is left."""
        if job.fatal is not None:
            raise job.fatal  # the engine dies, and resolves the job's pages with the rest
        if not job.reported:
            job.reported = True
            self.prefill_seconds += job.seconds
            self._report("prefill", len(job.pages), job.seconds)
        for piece in job.pieces:
            if piece.error is not None:
                failed, piece.pages = piece.pages, []
                self._fail(job, failed, piece.error)
            while piece.pages and free:
                n = min(len(piece.pages), len(free))
                slots, pages, rows = free[:n], piece.pages[:n], piece.rows[:n]
                del free[:n], piece.pages[:n], piece.rows[:n]
                try:
                    firsts = self.decoder.seat(slots, piece.prefilled, rows)
                except Exception as exc:
                    self.failed_prefills += 1
                    self._check_device(exc)
                    for slot in slots:  # written free on the device before the pages hear (a write that fails
                        self.decoder.release(slot)  # here kills the engine: the pages go back with the rest)
                    self._fail(job, pages, exc)
                    continue
                now = time.monotonic()
                for slot, request, token in zip(slots, pages, firsts, strict=True):
                    job.pages.remove(request)
                    request.inputs = {}  # the pixels are no longer needed
                    request.first_token = now
                    request.watch = self.guard.watch() if self.guard is not None else None
                    self.slots[slot] = request
                    self._advance(slot, request, token)
            if not piece.pages:
                piece.prefilled = None  # in the cache now, or not needed: the memory may go
        if not job.pages:
            self._jobs.remove(job)

    def _drop_unwanted_prefilled(self) -> None:
        """Prefilled pages whose job was cancelled, or that are past their deadline, leave at once, though
        they would wait for a slot: every slot may be busy with long pages."""
        for job in [j for j in self._jobs if j.done and j.fatal is None]:
            for piece in job.pieces:
                for request in [r for r in piece.pages if r.unwanted is not None]:
                    piece.drop(request)
                    self._fail(job, [request], request.unwanted)

    def _fail(self, job: PrefillJob, pages: list, error: BaseException) -> None:
        for request in pages:
            job.pages.remove(request)
            self._resolve(request, error=error)


def _out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys and values from the library's cache object, across its 5.x spellings."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]


def _parameters(fn) -> set[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(params) | {"input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask"}
    return set(params)
