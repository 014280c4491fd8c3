"""The scheduler's way back from a failed decode step: find the page that causes it, fail that page alone.

A step that fails is re-run on halves of the batch, the other pages paused (their state does not move),
down to the page that fails even alone; the rest go on decoding. If every page fails alone, or pages keep
failing alone with no good step between them, the engine is broken, not the pages: EngineDead, and the
worker hands every page back to the queue. After any failure the device is probed first: one that no
longer answers (a sticky CUDA error) is dead at once.

These steps are synchronous (each read before the next is launched), and start with nothing in flight.
"""

from __future__ import annotations

import logging
import time

from ...errors import EngineDead

log = logging.getLogger(__name__)

MAX_SOLO_FAILURES = 3
"""Pages in a row that fail decode steps alone, with no good step between them, before the engine is
declared broken: a broken engine returns pages to the queue instead of failing every job it sees."""


class Isolation:
    """Mixed into `Scheduler`: it owns `slots`, `decoder`, the counters, `_advance`, `_finish`, `_longest`
    and `_count_step`."""

    def _recover(self) -> None:
        """After a failed step: step halves of the batch alone until the page that causes it is found."""
        active = self._occupied()
        if not active:  # every page it would have stepped ended at the step before: nothing to find
            return
        suspects = self._isolate(active)
        if len(active) > 1 and len(suspects) == len(active):
            raise EngineDead(f"Every page fails decode steps on {self.decoder.device}, each alone: the engine is "
                             f"broken ({type(suspects[0][1]).__name__}: {suspects[0][1]}).")
        if suspects and len(suspects) < len(active):
            self._solo_failures = 0  # others stepped fine: these pages are the cause
        for slot, exc in suspects:
            log.error("the page in slot %d fails decode steps alone (%s: %s); failing it", slot,
                      type(exc).__name__, exc)
            self._finish(slot, self.slots[slot], error=exc)
        self._solo_failures += len(suspects)
        if self._solo_failures >= MAX_SOLO_FAILURES:
            raise EngineDead(f"{self._solo_failures} pages in a row failed decode steps on {self.decoder.device} "
                             "with no good step between them: the engine is broken.")

    def _isolate(self, slots: list[int]) -> list[tuple[int, BaseException]]:
        """Step halves of `slots` separately (the others paused); the slots that fail even alone."""
        halves = [slots] if len(slots) == 1 else [slots[:len(slots) // 2], slots[len(slots) // 2:]]
        suspects = []
        for half in halves:
            try:
                nxt = self._step(half)
            except Exception as exc:
                self._check_device(exc)
                suspects += self._isolate(half) if len(half) > 1 else [(half[0], exc)]
            else:
                for slot in half:
                    self._advance(slot, self.slots[slot], nxt[slot])
        return suspects

    def _step(self, slots: list[int]) -> list[int]:
        """One decode step for `slots`, read at once (the next token of every slot); other pages in flight
        are paused (their state does not move)."""
        stepping = set(slots)
        paused = [s for s in self._occupied() if s not in stepping]
        if paused:
            self.decoder.pause(paused)
        try:
            started = time.monotonic()
            nxt = self.decoder.step(max(slots) + 1, self._longest(slots)).tolist()
            self._count_step(len(slots), since=started)
        finally:
            if paused:
                self.decoder.resume(paused)
        return nxt

    def _check_device(self, exc: BaseException) -> None:
        """After a failure: raise EngineDead if the device itself is no longer usable."""
        if not self.decoder.healthy():
            raise EngineDead(f"The device {self.decoder.device} is unusable after "
                             f"{type(exc).__name__}: {exc}") from exc
