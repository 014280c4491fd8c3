"""The `celery -A gnosis_ocr.worker.celery_app` target."""

from celery import Celery

from ..broker import celery_config
from ..settings import Settings

settings = Settings.from_env()
app = Celery("gnosis-ocr")
app.conf.update(celery_config(settings))
app.conf.imports = ("gnosis_ocr.worker.tasks",)
# The model loads in each pool child after the fork, which can take minutes on a cold cache.
app.conf.worker_proc_alive_timeout = settings.lease_wait + 600
