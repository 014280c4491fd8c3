"""The baseline for queue overhead: a bare Celery round trip (`noop.delay().get()`) on the same Redis."""

import os

from celery import Celery

app = Celery("bare", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                worker_prefetch_multiplier=1, task_acks_late=True, worker_hijack_root_logger=False,
                task_default_queue="bare")


@app.task(name="bare.noop")
def noop() -> None:
    return None
