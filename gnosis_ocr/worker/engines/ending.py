"""How an engine ends: the pages it holds go back, each told whether it had a part in the death.

An engine dies when its device no longer answers (a sticky CUDA error), when an error escapes the recovery
paths, or when a page's thread finds it stuck long past the page's deadline. Every page it holds is then
resolved with EngineDead, touching nothing on the device, and the worker returns them to the queue. Which
page caused it is not known, only which pages had a part: those on the device (seated, or in a forward)
are charged with the death and come back as suspects (`admission.py`); those that only waited, or sat on
another device of the process, are not (EngineDeadWithoutPage). A hang narrows that down further: where
the loop still turns, only the forward that hangs on the prefill thread is charged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ... import defaults
from ...errors import EngineDead, EngineDeadWithoutPage
from .request import Request

log = logging.getLogger(__name__)


class Ending:
    """Mixed into `Scheduler`: it owns `decoder`, `slots`, `_limbo`, `_jobs`, `_pending`, `_cond`, `_thread`,
    `_prefiller`, `on_dead`, `dead`, `_stop`, the `_ending` state, `_idle`, `_turned`, `load` and `_resolve`."""

    def stalled(self, reason: str) -> None:
        """Called from a page's thread, again and again, while the loop has not answered long past a deadline.

        The loop is asked to end the engine itself, on its own thread, where nothing it holds changes under
        it (`_end_stuck`). A loop that was turning when asked misses no deadline: it drops pages past theirs
        at every turn. Then what hangs is a forward on the prefill thread, and only that forward's pages are
        charged with the death: the pages the loop went on stepping had no part in it. A loop that has not
        ended the engine ENGINE_LOOP_ANSWER seconds after it was first asked is stuck itself: the engine is
        ended from here, every page on the device charged, whatever the loop is stuck in."""
        now = time.monotonic()
        error = EngineDead(f"The engine on {self.decoder.device} stopped making progress: {reason}.")
        with self._cond:
            if self.dead is not None:
                return
            if self._ending is None and self._thread.is_alive():
                self._ending, self._ending_since = error, now
                self._ending_answering = self._idle or now - self._turned < defaults.ENGINE_LOOP_ANSWER
                self._cond.notify_all()
                return
            if self._ending is not None:
                if now - self._ending_since < defaults.ENGINE_LOOP_ANSWER:
                    return
                error = self._ending
        self._die(error)

    def kill(self, error: EngineDead) -> None:
        """End this loop from outside (another device of the process died): its pages go back too, with
        no part in it."""
        self._die(EngineDeadWithoutPage(error.message))

    def _end_stuck(self, error: EngineDead) -> None:
        """On the loop's thread: a page's thread found the engine stuck (`stalled`). If the loop was turning
        when asked, what hangs is a forward on the prefill thread, and only its pages are charged with the
        death (the engine cannot go on without that thread); otherwise the loop itself was stuck, and every
        page on the device is, as for any death."""
        hanging = {id(r) for job in self._jobs if not job.done for r in job.pages}
        if not (self._ending_answering and hanging):
            return self._die(error)
        log.error("the prefill thread on %s hangs in a forward of %d page(s) while the decode steps go on; only "
                  "those pages are charged with the engine's death", self.decoder.device, len(hanging))
        self._die(error, charged=lambda request: id(request) in hanging)

    def _die(self, exc: BaseException, *, charged: Callable[[Request], bool] | None = None) -> None:
        """Mark the engine dead and resolve every page it holds (`_drain`); `charged` says which pages had a
        part in it, where that is known better than "all those on the device"."""
        error = exc if isinstance(exc, EngineDead) else EngineDead(
            f"The engine on {self.decoder.device} failed and cannot go on: {type(exc).__name__}: {exc}")
        with self._cond:
            if self.dead is not None:
                return
            self.dead = error
            self._stop = True
        log.critical("engine on %s is dead (%s); returning its %d page(s) to the queue", self.decoder.device,
                     error.message, self.load(), exc_info=exc if exc is not error else None)
        self._drain(error, charged)
        if self._prefiller is not None:
            self._prefiller.stop(timeout=0)
        if self.on_dead is not None:
            try:
                self.on_dead(error)
            except Exception:
                log.exception("on_dead handler failed")

    def _drain(self, error: EngineDead, charged: Callable[[Request], bool] | None = None) -> None:
        """Resolve every request still held, touching nothing on the device: those on it (seated, or in a
        prefill), or those `charged` where given, with `error`; the others (waiting, taken and not yet
        prefilled) with an error that is not theirs."""
        aside = EngineDeadWithoutPage(error.message) if error.on_device else error

        def blame(request: Request) -> EngineDead:
            return error if charged is None or charged(request) else aside

        for slot, request in enumerate(self.slots):
            if request is not None:
                self.slots[slot] = None
                self._resolve(request, error=blame(request))
        for request in list(self._limbo):
            self._resolve(request, error=aside)
        jobs, self._jobs = self._jobs, []
        for request in [r for job in jobs for r in job.pages]:
            self._resolve(request, error=blame(request))
        with self._cond:
            while self._pending:
                self._resolve(self._pending.popleft(), error=aside)
