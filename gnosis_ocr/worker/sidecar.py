"""The light worker beside every page worker: webhooks and cache warm-ups, in their own process.

A page worker's pool slots are all busy with pages, so a webhook or a cache warm-up delivered to it
would wait for a page to finish, and a warm-up would inherit the page time limit (its threads pool
has none). They have their own queues; this process
consumes them, dies with its parent, and is restarted if it dies alone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from ..processes import die_with_parent

log = logging.getLogger(__name__)

RESTART_DELAY = 2.0
"""Seconds before a light worker that exited is started again."""

LIGHT_THREADS = 32
"""Threads of the light worker: webhooks wait on receivers, so slow receivers (each held at most
GNOSIS_WEBHOOK_TIMEOUT) delay only themselves and not everyone else's deliveries."""


def start_light_worker(*, loglevel: str = "INFO") -> threading.Thread:
    env = {**os.environ, "GNOSIS_WORKER_PORT": "0"}  # the probe port belongs to the GPU worker
    for name in ("GNOSIS_WORKER_ID", "GNOSIS_WORKER_ID_OWNER"):  # it is a worker of its own
        env.pop(name, None)
    args = [sys.executable, "-m", "gnosis_ocr.cli", "worker", "--light", f"--concurrency={LIGHT_THREADS}",
            f"--loglevel={loglevel}"]

    def supervise() -> None:
        while True:
            proc = subprocess.Popen(args, env=env, preexec_fn=die_with_parent())
            code = proc.wait()
            if code in (-signal.SIGTERM, -signal.SIGINT):
                # Asked to stop (the stack is shutting down, or an operator stopped it): not a crash.
                log.info("light worker stopped by signal %d; not restarting", -code)
                return
            log.warning("light worker exited with %s; restarting in %.0fs", code, RESTART_DELAY)
            time.sleep(RESTART_DELAY)  # a restart back-off, not a synchronisation

    thread = threading.Thread(target=supervise, name="gnosis-light-worker", daemon=True)
    thread.start()
    return thread
