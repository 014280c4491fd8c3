"""The `celery -A gnosis_ocr.worker.celery_app` target."""

import billiard.pool
from celery import Celery

from ..broker import celery_config
from ..settings import Settings
from . import detached, loopwatch, refusals, subscription

refusals.install()  # a Redis refusing writes pauses consumption instead of stopping the worker
subscription.install()  # a dropped pub/sub connection is reconnected by Celery, never read on forever
detached.install()  # a channel closed after Redis went away is a lost connection, not a stopped worker

settings = Settings.from_env()
app = Celery("gnosis-ocr")
app.conf.update(celery_config(settings))
app.conf.imports = ("gnosis_ocr.worker.tasks",)
app.steps["consumer"].add(loopwatch.Watch)  # a loop that stops turning stops the worker
# The model loads in each pool child after the fork, which can take minutes on a cold cache.
app.conf.worker_proc_alive_timeout = settings.lease_wait + 600

# A prefork child that finishes its page during a warm shutdown waits until the main process has read
# its result, up to 300 x 0.1 s. Celery 5.7's shutdown sometimes stops reading first (the pool's result
# handler leaves while a page still runs), and the worker then exits 30 s after SIGTERM, past most
# grace periods. Nothing is lost by waiting less: the page is recorded in Redis by the child itself, and
# the message the main process did not acknowledge is restored to the queue, where the next delivery
# finds the page done. Read by the children at run time; they inherit it across the fork.
billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = 30
