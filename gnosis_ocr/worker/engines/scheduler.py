"""Continuous batching: one thread owns a device and decodes every page in flight, one step at a time.

Pages come from any job, from many worker threads. A page that finishes leaves its slot at the step
it ends, and a waiting page is seated there, so nobody waits for the longest page of a batch
(`admission.py`: which waiting pages get a slot, and when; `prefill.py`: their forward, on this thread
or on one of its own beside the steps). Deadlines and
cancellations are checked at every step, for waiting pages as well as decoding ones: a page over its time
limit or of a cancelled job leaves without disturbing the others.

Each step is launched before the previous one's tokens are read, so the host's work per step (ends,
limits, the repetition guard, metrics: about 1-2 ms for 64-128 pages, `bench/engine_host.py`) runs
while the device computes instead of between its steps.

Failures cost as little as they can, and every request is resolved exactly once:
- a prefill that fails is retried in halves (smaller chunks after running out of memory), down to the
  one page that fails alone, which fails;
- a decode step that fails is narrowed down to the page that causes it (`isolation.py`);
- after any failure the device is probed; a device that no longer answers (a sticky CUDA error), a step
  whose result never reaches the host, or any error inside the recovery itself ends the loop: the engine
  is dead, every page it held is resolved with EngineDead (the worker returns them to the queue), and
  `on_dead` tells the worker to restart (`ending.py`; so does a loop found stuck past a page's deadline);
- which pages were on the device then is known, not which of them caused it: those are suspects, and a
  suspect shares the device with few others (`admission.py`), so a page that kills engines is found out
  without failing the pages beside it (docs/gpu.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from ...errors import EngineCheckFailed, EngineDead, EngineDeadWithoutPage
from . import StopReason
from .admission import Admission
from .ending import Ending
from .isolation import Isolation
from .prefill import Prefiller, Prefilling, PrefillJob, check_stream
from .repetition import RepetitionGuard
from .request import Request

log = logging.getLogger(__name__)

__all__ = ["Request", "RepetitionGuard", "Scheduler"]


class Scheduler(Admission, Prefilling, Isolation, Ending):
    """The engine loop for one device. `submit` is thread-safe; everything else runs on the loop thread."""

    def __init__(self, decoder, *, eos_ids: set[int], prefill_batch: int = 4, gather: float = 0.0,
                 guard: RepetitionGuard | None = None, on_work: Callable[[str, int, float], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None, name: str = "engine",
                 concurrent: bool = False) -> None:
        self.decoder = decoder
        self.eos_ids = eos_ids
        self.prefill_batch = max(1, prefill_batch)
        self.gather = max(0.0, gather)  # seconds free slots may wait for a full chunk while pages queue
        self.guard = guard if guard is not None and guard.enabled else None
        self.on_work = on_work  # ("prefill" or "decode", pages, seconds) after each prefill chunk and step
        self.on_dead = on_dead
        self._report_failed = False
        self.slots: list[Request | None] = [None] * decoder.slots
        self._pending: deque[Request] = deque()
        self._limbo: list[Request] = []  # taken from the queue, not yet seated in a slot
        self._jobs: list[PrefillJob] = []  # prefills not yet seated: the last may still be computing
        # Prefills on a thread (and CUDA stream) of their own, the loop stepping the seated pages meanwhile.
        self._prefiller = Prefiller(decoder, self._compute, self._wake, name=name) if concurrent else None
        self._cond = threading.Condition()
        self._stop = False
        # A page's thread found the engine stuck (`stalled`): the loop ends it itself if it can.
        self._ending: EngineDead | None = None
        self._ending_since = 0.0
        self._ending_answering = False  # whether the loop was turning then, or waiting with nothing to do
        self._idle = False
        self._turned = time.monotonic()
        self.dead: EngineDead | None = None
        self.check: dict | None = None  # the start-up graph-against-eager check, once warm
        self.stream_check: dict | None = None  # the start-up check of the prefill stream, where concurrent
        self.steps = 0
        self.tokens = 0
        self.failed_steps = 0
        self.failed_prefills = 0
        self._solo_failures = 0
        self._inflight: _Launched | None = None  # the step launched and not yet read
        self._accounted = 0.0  # the loop's time up to here is counted, as prefill or as decode
        self.step_seconds = 0.0  # wall time in decode steps (read back included): ms per step for benchmarks
        self.prefill_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"gnosis-{name}", daemon=True)

    @property
    def capacity(self) -> int:
        return self.decoder.slots

    @property
    def alive(self) -> bool:
        return self.dead is None and (self._thread.is_alive() or not self._thread.ident)

    def load(self) -> int:
        """Pages in flight or waiting: the busiest scheduler gets the next page last."""
        prefilling = sum(len(job.pages) for job in self._jobs)
        return len(self._pending) + len(self._limbo) + prefilling + self._in_flight()

    @property
    def concurrent(self) -> bool:
        """Whether prefills run beside the decode steps (`prefill.py`)."""
        return self._prefiller is not None

    def start(self) -> Scheduler:
        if self._prefiller is not None:
            self._prefiller.start()
        self._thread.start()
        return self

    def warm_up(self, request: Request) -> int:
        """Before `start`: capture every decode graph, run `request` through on the caller's thread, and
        check its first step as replayed against the same step run eagerly (EngineCheckFailed if not
        bit-identical: a worker that would serve wrong text refuses to start)."""
        on_work, self.on_work = self.on_work, None  # the warm-up page is nobody's: its work is not reported
        try:
            with self.decoder.device_context():
                if self._prefiller is not None:
                    self._check_stream(request)
                graphs = self.decoder.warm_up()
                self._limbo.append(request)
                self._prefill([0], [request])
                if self.slots[0] is not None:
                    self.check = self.decoder.self_check(1, request.length + len(request.tokens))
                    if not self.check["identical"]:
                        raise EngineCheckFailed(
                            f"the decode graph on {self.decoder.device} does not reproduce the eager step (largest "
                            f"difference {self.check['max_abs_diff']:.3g}); refusing to serve wrong text")
                    self._advance(0, request, int(self.decoder.next_tokens[0]))
                while any(self.slots) or self._inflight is not None:
                    self._decode()
        finally:
            self.on_work = on_work
        if request.error is not None:
            raise request.error
        return graphs

    def _check_stream(self, request: Request) -> None:
        """Prefills beside the decode steps only where a forward on the prefill stream is bit-identical to
        the same forward on the loop's (`prefill.check_stream`); otherwise on the loop's thread."""
        try:
            self.stream_check = check_stream(self.decoder, [request.inputs], self._prefiller.stream)
        except Exception as exc:
            self.stream_check = {"device": str(self.decoder.device), "identical": False, "error": repr(exc)}
        if not self.stream_check["identical"]:
            log.warning("prefills on %s stay on the engine loop's thread: a forward on their own stream does not "
                        "reproduce it (%s)", self.decoder.device, self.stream_check)
            self._prefiller = None

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.ident:
            self._thread.join(timeout=30)
        if self._prefiller is not None:
            self._prefiller.stop()

    def submit(self, request: Request) -> Request:
        with self._cond:
            if self.dead is not None:
                raise EngineDeadWithoutPage(self.dead.message)
            if self._stop:
                raise EngineDeadWithoutPage("The engine is stopping.")
            self._pending.append(request)
            self._cond.notify()
        return request

    # --- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.decoder.bind_thread(steps=self.concurrent)
            while True:
                with self._cond:
                    self._idle = True
                    while not self._stop and self._ending is None and not self._runnable():
                        self._cond.wait()
                    self._idle = False
                    self._turned = time.monotonic()
                    if self._stop or self.dead is not None:
                        break
                    ending = self._ending
                if ending is not None:
                    return self._end_stuck(ending)
                self._drop_unwanted()
                self._admit()
                if any(self.slots) or self._inflight is not None:
                    self._decode()
        except BaseException as exc:  # anything that escapes the recovery paths: the device is not trusted
            self._die(exc)
            return
        self._drain(EngineDeadWithoutPage("The engine stopped."))

    def _runnable(self) -> bool:
        """Whether the loop has anything to do now (checked under `_cond`)."""
        if any(self.slots) or self._inflight is not None:
            return True
        if self._jobs:  # nothing to step: seat what is prefilled, or wait for the forward (it wakes the loop)
            return any(job.done for job in self._jobs)
        return bool(self._pending or self._limbo)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _in_flight(self) -> int:
        return len(self._occupied())

    def _occupied(self) -> list[int]:
        return [slot for slot, r in enumerate(self.slots) if r is not None]

    def _decode(self) -> None:
        """One step for every page in flight, launched before the previous step's tokens are read: the
        host's work on those (ends, limits, the repetition guard, metrics) then runs while the device
        computes, instead of leaving it idle between steps. A page that ended at the previous step is
        computed once more in the step already launched, and that token is dropped.

        A step that fails to launch is narrowed down to the page that causes it, with nothing in flight."""
        active = self._occupied()
        launched = None
        if active:
            try:
                launched = self._launch(active)
            except Exception as exc:
                self.failed_steps += 1
                self._check_device(exc)
                log.warning("decode step failed for %d page(s) (%s: %s); isolating the page that causes it",
                            len(active), type(exc).__name__, exc)
                self._settle()  # the step before it stands: its tokens are taken first
                return self._recover()
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._collect(previous)

    def _launch(self, active: list[int]) -> _Launched:
        # A step still in flight moves every page one position further than the host has seen yet.
        ahead = 1 if self._inflight is not None else 0
        started = time.monotonic()
        handle = self.decoder.launch(max(active) + 1, self._longest(active) + ahead)
        return _Launched([(s, self.slots[s]) for s in active], handle, started)

    def _collect(self, step: _Launched) -> None:
        """Read a launched step's tokens and advance the pages it stepped that are still seated."""
        try:
            nxt = self.decoder.collect(step.handle)
        except Exception as exc:  # the device's state after a step whose result never came is unknown
            raise EngineDead(f"A decode step's result could not be read on {self.decoder.device}: "
                             f"{type(exc).__name__}: {exc}") from exc
        # From its launch, or from the last time counted (a result, a prefill) if that came later: a step
        # that ran under a prefill is the prefill's time, which already waited for it.
        self._count_step(len(step.pages), since=max(step.started, self._accounted))
        self._solo_failures = 0
        for slot, request in step.pages:
            if self.slots[slot] is request:  # not ended at the step before, nor replaced since
                self._advance(slot, request, nxt[slot])

    def _longest(self, slots: list[int]) -> int:
        """Cache positions the next step of `slots` must attend over, as far as the host has read."""
        return max(self.slots[s].length + len(self.slots[s].tokens) for s in slots)

    def _count_step(self, pages: int, *, since: float) -> None:
        now = time.monotonic()
        self._accounted = now
        self.step_seconds += now - since
        self.steps += 1
        self.tokens += pages
        self._report("decode", pages, now - since)

    def _settle(self) -> None:
        """Read the step in flight, if any (before steps that are read at once)."""
        previous, self._inflight = self._inflight, None
        if previous is not None:
            self._collect(previous)

    def _report(self, phase: str, pages: int, seconds: float) -> None:
        # Telemetry must never look like a failed step or prefill: its errors stay here, logged once (a
        # recorder that fails, fails at every step).
        if self.on_work is not None:
            try:
                self.on_work(phase, pages, seconds)
            except Exception:
                if not self._report_failed:
                    log.exception("recording the engine's %s work failed; the engine goes on", phase)
                self._report_failed = True

    def _advance(self, slot: int, request: Request, token: int) -> None:
        """Take a page's new token; end the page when it is complete, stuck, late or unwanted."""
        reason = request.unwanted
        if reason is not None:
            return self._finish(slot, request, error=reason)
        if token in self.eos_ids:
            return self._finish(slot, request, reason=StopReason.EOS)
        request.tokens.append(token)
        if len(request.tokens) >= request.max_new_tokens:
            return self._finish(slot, request, reason=StopReason.MAX_TOKENS)
        if request.length + len(request.tokens) + 1 >= self.decoder.max_len:
            return self._finish(slot, request, reason=StopReason.MAX_TOKENS)
        if request.watch is not None and request.watch.update(request.tokens):
            return self._finish(slot, request, reason=StopReason.REPETITION)
        return None

    def _finish(self, slot: int, request: Request, *, reason: StopReason | None = None,
                error: BaseException | None = None) -> None:
        self.slots[slot] = None
        request.stop_reason = reason
        # Resolved before the slot is released on the device: if that write fails, the page's text
        # (or its error) is already with its thread, and only the engine dies.
        self._resolve(request, error=error)
        self.decoder.release(slot)

    def _resolve(self, request: Request, *, error: BaseException | None = None) -> None:
        request.resolutions += 1
        if request in self._limbo:
            self._limbo.remove(request)
        if request.resolutions > 1:
            log.error("a page was resolved %d times; keeping its first outcome", request.resolutions)
            return
        request.error = error
        request.finished = time.monotonic()
        request.done.set()


class _Launched:
    """A step on the device: the pages it steps (slot and request, as seated at launch) and its result."""

    __slots__ = ("handle", "pages", "started")

    def __init__(self, pages: list[tuple[int, Request]], handle, started: float) -> None:
        self.pages, self.handle, self.started = pages, handle, started

