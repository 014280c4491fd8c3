"""Which waiting pages the scheduler seats in free slots, and when.

Prefills on the loop's thread: one chunk per loop turn, so a burst of arrivals holds the running pages up
one chunk at a time, and once the batch is full, freed slots may wait a moment to be refilled together
(`_gathering`). Prefills beside the steps: a full chunk ahead of the slots it takes, each freed slot taking
a prefilled page at once (`_admit_beside`). Either way, cancelled and expired pages leave the queue at
every turn, even while every slot is busy.

Pages that were on a device when its engine died come back as suspects (`Request.deaths`): one of them may
kill any engine it runs on, and which one is not known. Whoever shares a device with such a page at its next
death becomes a suspect too, so suspects share a device with few others (`ENGINE_SUSPECT_SHARE`), fresh
pages filling the rest of the batch; after ENGINE_DEATHS_ALONE deaths a page runs alone, once the device is
empty, and nothing joins it. A page that kills the engine then is the cause, and fails alone (the worker);
the others were beside it at most once as suspects, and no page's attempts are spent on a death.
"""

from __future__ import annotations

import time
from collections import deque

from ... import defaults
from .request import Request

GATHER_MIN_SHARE = 8
"""Gathering leaves up to `prefill_batch - 1` slots empty while it waits; it is done only where that is at
most one slot in this many (4-page chunks: batches of 24 slots or more). A small batch would decode
markedly fewer tokens for it (3 empty slots of 4 is three quarters), a CPU's batch of 4 among them."""


class Admission:
    """Mixed into `Scheduler`: it owns `slots`, `capacity`, `_pending`, `_limbo`, `_cond`, `prefill_batch`,
    `gather`, `concurrent`, `_jobs`, `_inflight` and `_resolve`; `Prefilling` the rest."""

    _gathering_since: float | None = None

    def _drop_unwanted(self) -> None:
        """Cancelled and expired pages leave the queue even while every slot is busy."""
        for request in [r for r in self._limbo if r.unwanted is not None]:
            self._resolve(request, error=request.unwanted)
        self._drop_unwanted_prefilled()
        with self._cond:
            if not any(r.unwanted for r in self._pending):
                return
            keep: deque[Request] = deque()
            while self._pending:
                request = self._pending.popleft()
                reason = request.unwanted
                if reason is None:
                    keep.append(request)
                else:
                    self._resolve(request, error=reason)
            self._pending = keep

    def _admit(self) -> None:
        """Seat waiting pages in free slots, one prefill chunk per loop turn: a burst of arrivals then holds
        the running pages up for one chunk between steps, never for all of them (64 free slots at 4 pages
        a chunk would otherwise be 16 prefills back to back, seconds without a token)."""
        if self.concurrent:
            return self._admit_beside()
        free = [slot for slot, r in enumerate(self.slots) if r is None]
        if not free:
            return
        with self._cond:
            self._take_waiting(len(free))
            waiting = len(self._pending) + len(self._limbo)
        if not self._limbo or self._gathering(len(free), waiting):
            return
        while self._limbo:
            # Prompts of equal length need no padding: prefill them together, oldest page's length first.
            length = self._limbo[0].length
            chunk = [r for r in self._limbo if r.length == length][:self.prefill_batch]
            self._prefill(free[:len(chunk)], chunk)
            if any(self.slots):  # a step next; the rest of the limbo waits one turn
                return
            free = [slot for slot, r in enumerate(self.slots) if r is None]  # the chunk failed: try the next

    def _admit_beside(self) -> None:
        """With prefills beside the steps: seat prefilled pages, oldest first, in the slots free now, and keep
        the prefill thread one chunk ahead. A full chunk is prefilled as soon as its pages wait, whether or
        not slots are free yet: they free one at a time, and each then takes its page at once. A smaller
        chunk (fewer pages of one length wait) only where a slot is free for each of its pages, so that
        pages that come meanwhile can make a full one. One forward at a time, and none while a chunk's
        worth of prefilled pages still waits for slots (its keys and values hold memory)."""
        free = [slot for slot, r in enumerate(self.slots) if r is None]
        for job in [j for j in self._jobs if j.done]:
            self._seat(job, free)
        if any(not job.done for job in self._jobs):
            return
        ready = sum(len(job.pages) for job in self._jobs)
        if ready >= self.prefill_batch:
            return
        with self._cond:
            self._take_waiting(self.prefill_batch)
        if not self._limbo:
            return
        length = self._limbo[0].length
        chunk = [r for r in self._limbo if r.length == length][:self.prefill_batch]
        # Nothing decoding frees no slot: then whatever waits goes (a batch smaller than a chunk, say).
        if len(chunk) < self.prefill_batch and len(free) - ready < len(chunk) and any(self.slots):
            return
        self._start_prefill(chunk)

    def _take_waiting(self, room: int) -> None:
        """Move waiting pages into `_limbo` until it holds `room`, oldest first, as the suspects' rules allow
        (the module's text); called under `_cond`."""
        held = [r for r in self.slots if r is not None] + self._limbo + [r for job in self._jobs for r in job.pages]
        if any(r.deaths >= defaults.ENGINE_DEATHS_ALONE for r in held):
            return  # nothing joins a page that runs alone
        alone = next((r for r in self._pending if r.deaths >= defaults.ENGINE_DEATHS_ALONE), None)
        if alone is not None:  # nothing more is taken until the device is empty, then that page alone
            if not held and self._inflight is None:
                self._pending.remove(alone)
                self._limbo.append(alone)
            return
        suspects = sum(1 for r in held if r.deaths)
        share = max(1, self.capacity // defaults.ENGINE_SUSPECT_SHARE)
        passed: deque[Request] = deque()
        while self._pending and len(self._limbo) < room:
            request = self._pending.popleft()
            if request.deaths and suspects >= share:
                passed.append(request)
                continue
            suspects += bool(request.deaths)
            self._limbo.append(request)
        passed.extend(self._pending)
        self._pending = passed

    def _gathering(self, free: int, waiting: int) -> bool:
        """Whether to leave free slots empty a little longer, so that the next prefill seats a full chunk.

        Once the batch is full, pages end one at a time, and refilling each freed slot at once makes every
        prefill one page. A prefill costs the host much the same whatever its size (some 4,600 calls from
        Python for one page or three, `bench/kernel_count.py`), and no page of the batch decodes while it
        runs. So while pages queue for slots (more waiting than free), freed slots wait up to `gather`
        seconds for `prefill_batch` of them, then take what waits. Never while the batch is empty or a seat
        is free for every waiting page (the wait would buy nothing), nor in a small batch."""
        if (self.gather <= 0 or free >= self.prefill_batch or waiting <= free or not any(self.slots)
                or (self.prefill_batch - 1) * GATHER_MIN_SHARE > self.capacity):
            self._gathering_since = None
            return False
        now = time.monotonic()
        if self._gathering_since is None:
            self._gathering_since = now
        if now - self._gathering_since < self.gather:
            return True
        self._gathering_since = None
        return False
