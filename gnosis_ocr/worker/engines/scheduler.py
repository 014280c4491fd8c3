"""Continuous batching: one thread owns a device and decodes every page in flight, one step at a time.

Pages come from any job, from many worker threads. A page that finishes leaves its slot at the step
it ends, and a waiting page is prefilled into that slot before the next step, so nobody waits for
the longest page of a batch. Deadlines and cancellations are checked at every step: a page over its
time limit or of a cancelled job leaves the batch without disturbing the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ...errors import PageTimeout
from . import Cancelled

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """One page on its way through a scheduler; the submitting thread waits on `done`."""

    inputs: dict
    length: int
    max_new_tokens: int
    deadline: float | None = None
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    tokens: list[int] = field(default_factory=list)
    stop_reason: str | None = None  # "eos", "max_tokens", "repetition"
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _cancel: bool = False

    def cancel(self) -> None:
        self._cancel = True

    @property
    def truncated(self) -> bool:
        return self.stop_reason in ("max_tokens", "repetition")


class RepetitionGuard:
    """Spots output that has started repeating itself: the last `window` tokens are one unit of at most
    `window // min_repeats` tokens over and over (the known failure of VLMs on tables)."""

    def __init__(self, window: int, min_repeats: int = 4, every: int = 16) -> None:
        self.window = window
        self.max_period = window // max(min_repeats, 2)
        self.every = every

    def repeating(self, tokens: list[int]) -> bool:
        n = len(tokens)
        if self.window <= 0 or n < self.window or n % self.every:
            return False
        tail = np.asarray(tokens[-self.window - self.max_period:], dtype=np.int64)
        last = tail[-self.window:]
        # A period p must repeat the last token p places back: test only those candidates.
        candidates = np.nonzero(tail[-self.max_period - 1:-1] == tail[-1])[0]
        for p in sorted(self.max_period - candidates):
            if np.array_equal(last[p:], last[:-p]):
                return True
        return False


class Scheduler:
    """The engine loop for one device. `submit` is thread-safe; everything else runs on the loop thread."""

    def __init__(self, decoder, *, eos_ids: set[int], prefill_batch: int = 4, guard: RepetitionGuard | None = None,
                 on_step: Callable[[int], None] | None = None, name: str = "engine") -> None:
        self.decoder = decoder
        self.eos_ids = eos_ids
        self.prefill_batch = max(1, prefill_batch)
        self.guard = guard
        self.on_step = on_step
        self.slots: list[Request | None] = [None] * decoder.slots
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.steps = 0
        self.tokens = 0
        self.step_seconds = 0.0  # wall time in decode steps (read back included): ms per step for benchmarks
        self.prefill_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"gnosis-{name}", daemon=True)

    @property
    def capacity(self) -> int:
        return self.decoder.slots

    def load(self) -> int:
        """Pages in flight or waiting: the busiest scheduler gets the next page last."""
        return len(self._pending) + self._in_flight()

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def warm_up(self, request: Request) -> int:
        """Before `start`: capture every decode graph and run `request` through on the caller's thread."""
        graphs = self.decoder.warm_up()
        self._prefill([0], [request])
        while any(self.slots):
            self._step()
        if request.error is not None:
            raise request.error
        return graphs

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> Request:
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is stopping")
            self._pending.append(request)
            self._cond.notify()
        return request

    # --- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending and not any(self.slots):
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self._admit()
                if any(self.slots):
                    self._step()
            except Exception as exc:  # a failed step loses its batch, never the loop
                log.exception("decode step failed; failing the %d page(s) in flight", self._in_flight())
                for slot, request in enumerate(self.slots):
                    if request is not None:
                        self._finish(slot, request, error=exc)
        for slot, request in enumerate(self.slots):
            if request is not None:
                self._finish(slot, request, error=RuntimeError("the engine stopped"))
        with self._cond:
            while self._pending:
                self._resolve(self._pending.popleft(), error=RuntimeError("the engine stopped"))

    def _in_flight(self) -> int:
        return sum(r is not None for r in self.slots)

    def _admit(self) -> None:
        free = [slot for slot, r in enumerate(self.slots) if r is None]
        if not free:
            return
        taken: list[Request] = []
        with self._cond:
            while self._pending and len(taken) < len(free):
                request = self._pending.popleft()
                if request._cancel:
                    self._resolve(request, error=Cancelled())
                elif _expired(request):
                    self._resolve(request, error=_timeout(request))
                else:
                    taken.append(request)
        # Prompts of equal length need no padding: prefill them together.
        groups: dict[int, list[Request]] = {}
        for request in taken:
            groups.setdefault(request.length, []).append(request)
        for group in groups.values():
            for start in range(0, len(group), self.prefill_batch):
                chunk = group[start:start + self.prefill_batch]
                slots = [free.pop(0) for _ in chunk]
                self._prefill(slots, chunk)

    def _prefill(self, slots: list[int], chunk: list[Request]) -> None:
        now = time.monotonic()
        for request in chunk:
            request.admitted = now
        try:
            firsts = self.decoder.prefill(slots, _concat([r.inputs for r in chunk]))
            self.prefill_seconds += time.monotonic() - now
        except Exception as exc:
            log.exception("prefill failed for %d page(s)", len(chunk))
            for slot, request in zip(slots, chunk, strict=True):
                self.decoder.release(slot)
                self._resolve(request, error=exc)
            return
        now = time.monotonic()
        for slot, request, token in zip(slots, chunk, firsts, strict=True):
            request.inputs = {}  # the pixels are no longer needed
            request.first_token = now
            self.slots[slot] = request
            self._advance(slot, request, token)

    def _step(self) -> None:
        top = max(slot for slot, r in enumerate(self.slots) if r is not None)
        longest = max(r.length + len(r.tokens) for r in self.slots if r is not None)
        started = time.monotonic()
        nxt = self.decoder.step(top + 1, longest).tolist()
        self.step_seconds += time.monotonic() - started
        active = self._in_flight()
        self.steps += 1
        self.tokens += active
        if self.on_step is not None:
            self.on_step(active)
        for slot, request in enumerate(self.slots):
            if request is not None:
                self._advance(slot, request, nxt[slot])

    def _advance(self, slot: int, request: Request, token: int) -> None:
        """Take a page's new token; end the page when it is complete, stuck, late or unwanted."""
        if request._cancel:
            return self._finish(slot, request, error=Cancelled())
        if _expired(request):
            return self._finish(slot, request, error=_timeout(request))
        if token in self.eos_ids:
            return self._finish(slot, request, reason="eos")
        request.tokens.append(token)
        if len(request.tokens) >= request.max_new_tokens:
            return self._finish(slot, request, reason="max_tokens")
        if request.length + len(request.tokens) + 1 >= self.decoder.max_len:
            return self._finish(slot, request, reason="max_tokens")
        if self.guard is not None and self.guard.repeating(request.tokens):
            return self._finish(slot, request, reason="repetition")
        return None

    def _finish(self, slot: int, request: Request, *, reason: str | None = None,
                error: BaseException | None = None) -> None:
        self.slots[slot] = None
        self.decoder.release(slot)
        request.stop_reason = reason
        self._resolve(request, error=error)

    @staticmethod
    def _resolve(request: Request, *, error: BaseException | None = None) -> None:
        request.error = error
        request.finished = time.monotonic()
        request.done.set()


def _expired(request: Request) -> bool:
    return request.deadline is not None and time.monotonic() > request.deadline


def _timeout(request: Request) -> PageTimeout:
    return PageTimeout(f"The page was stopped after {time.monotonic() - request.submitted:.0f} seconds, "
                       "over its time limit.")


def _concat(inputs: list[dict]) -> dict:
    """Processor outputs of equal-length prompts as one batch."""
    import torch

    if len(inputs) == 1:
        return inputs[0]
    return {key: torch.cat([i[key] for i in inputs], dim=0) for key in inputs[0]}
