"""A worker whose event loop stops turning stops itself, instead of saying it is alive and taking nothing.

Celery's consumer takes, records and acknowledges every message on one event loop (kombu's hub); the
heartbeat beats from a thread of its own. So a loop blocked for good (a blocking read that never
returns, as a dropped pub/sub connection once caused: worker/subscription.py) left a worker whose
record stayed fresh while it consumed nothing: its pages waited for ever, and no other worker took
them over. Here the loop marks each turn (`Watch`, a consumer bootstep); the heartbeat thread, after a
beat that reached Redis, checks the mark, and a loop that has not turned for GNOSIS_LOOP_STALL_TIMEOUT
seconds while Redis answered ends the process: its record is removed, so the other workers' reaper
returns its pages at once, and its supervisor starts a fresh one.

Waits that hold the loop on purpose (worker/refusals.py, while Redis refuses writes) mark it too; a
consumer reconnecting is not counted, nor is time before Redis answered the heartbeat again.
"""

from __future__ import annotations

import logging
import os
import time

from celery import bootsteps

log = logging.getLogger(__name__)

EXIT_LOOP_STALLED = 70
"""The exit status of a worker whose loop stalled (EX_SOFTWARE, as for a dead engine): its supervisor
starts a fresh process."""

_turned: float | None = None


def turned() -> None:
    """The loop (or a wait that holds it on purpose) is making progress."""
    global _turned
    _turned = time.monotonic()


def stalled_for(*, answering_since: float) -> float:
    """Seconds the loop has not turned, counted from `answering_since` (monotonic) at the earliest: the
    time Redis began answering again. 0 before the loop first ran (the engine loading, say)."""
    if _turned is None:
        return 0.0
    return time.monotonic() - max(_turned, answering_since)


def stopping() -> bool:
    """Celery is shutting this worker down: a warm or cold shutdown holds the loop on purpose."""
    from celery.worker import state

    # Set to the exit code, and a warm shutdown's is 0: Celery's own test (maybe_shutdown) is this one.
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


def stop_stalled(seconds: float, unregister) -> None:
    """End this process: `unregister()` first, so the reaper need not wait for the record to lapse."""
    log.critical("the worker's event loop has not turned for %.0fs while Redis answered: it takes and "
                 "acknowledges nothing any more; exiting %d so that a fresh worker replaces it (its pages "
                 "go back to the queue)", seconds, EXIT_LOOP_STALLED)
    try:
        unregister()
    finally:
        logging.shutdown()
        os._exit(EXIT_LOOP_STALLED)  # the loop cannot run a warm shutdown: it is the thing that is stuck


def _not_running() -> None:
    global _turned
    _turned = None


class Watch(bootsteps.StartStopStep):
    """Marks every turn of the consumer's event loop. Celery stops its consumer's steps when the connection
    is lost and starts them again once it is back: between the two, reconnecting (backing off up to 30 s
    between tries) is not a stall."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c) -> None:
        hub = getattr(c, "hub", None)
        if hub is not None:
            turned()
            hub.on_tick.add(turned)

    def stop(self, c) -> None:
        _not_running()

    def shutdown(self, c) -> None:
        _not_running()
