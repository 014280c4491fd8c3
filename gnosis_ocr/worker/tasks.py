"""Thin Celery tasks: everything they do lives in `runtime` and `page`."""

from celery import signals

from ..broker import OCR_PAGE_TASK, WARM_CACHE_TASK
from . import page, runtime
from .celery_app import app


@app.task(name=OCR_PAGE_TASK, bind=True)
def ocr_page(self, job_id: str, page_index: int) -> str:
    return page.run_page(runtime.get(), job_id, page_index, worker=self.request.hostname or "")


@app.task(name=WARM_CACHE_TASK, ignore_result=True)
def warm_cache() -> str:
    return runtime.get().warm_cache()


@signals.worker_process_init.connect
def _load_engine_in_child(**_) -> None:
    # Loaded after the fork, once per pool process; never in the parent, which forks.
    runtime.get().preload()
