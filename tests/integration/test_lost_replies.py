"""A script that ran but whose reply was lost is retried by the worker's client with the same delivery
token: it acts once and answers as the first time. And a job's webhook is owed from the very script
that made the job final, so a worker killed before it published the delivery loses none."""

from __future__ import annotations

import signal

import pytest
import requests

from gnosis_ocr import job_scripts
from harness.docs import text_image
from harness.stack import poll_job, wait_until
from tests.integration.test_webhooks import Receiver, hooks_env
from tests.redisproxy import ReplyLosingProxy


@pytest.fixture
def proxy(redis_url):
    p = ReplyLosingProxy(redis_url)
    yield p
    p.stop()


def test_a_claim_whose_reply_was_lost_counts_one_attempt(stack, proxy):
    url = stack.api()
    proxy.lose_reply_to(job_scripts.START_PAGE)
    # One attempt allowed: a retried claim counted twice would fail the job with worker_lost.
    stack.worker(REDIS_URL=proxy.url, GNOSIS_PAGE_MAX_ATTEMPTS="1")
    job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["lost reply"]))}).json()
    assert proxy.lost.wait(60), "the worker never claimed the page"
    final = poll_job(url, job["id"])
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 1


def test_a_record_whose_reply_was_lost_still_counts_the_job_and_sends_its_webhook(stack, proxy):
    receiver = Receiver()
    try:
        hooks_env(stack)
        url = stack.api()
        proxy.lose_reply_to(job_scripts.FINISH_PAGE)
        stack.worker(REDIS_URL=proxy.url)
        job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["lost reply"]))},
                            data={"callback_url": receiver.url}).json()
        assert proxy.lost.wait(60), "the worker never recorded the page"
        assert poll_job(url, job["id"])["status"] == "succeeded"
        # The retried record answered "recorded, the last page": the worker counted the job and announced it.
        wait_until(lambda: receiver.calls, timeout=30, message="the webhook")
        assert len(receiver.calls) == 1
        wait_until(lambda: 'gnosis_jobs_finished_total{code="",outcome="succeeded"} 1.0'
                   in requests.get(f"{url}/metrics").text, timeout=10, message="the job to be counted")
    finally:
        receiver.stop()


def test_a_worker_killed_between_the_final_record_and_the_webhook_publish_loses_no_webhook(stack, proxy):
    receiver = Receiver()
    try:
        hooks_env(stack)
        stack.env.update(GNOSIS_RECONCILE_GRACE="1")
        url = stack.api()
        doomed = stack.worker(REDIS_URL=proxy.url)
        # The page is recorded and the job final in Redis; the worker dies before it hears so.
        proxy.lose_reply_to(job_scripts.FINISH_PAGE, then=lambda: doomed.kill_tree(signal.SIGKILL))
        job = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", text_image(["owed webhook"]))},
                            data={"callback_url": receiver.url}).json()
        assert proxy.lost.wait(60), "the worker never recorded the page"
        assert poll_job(url, job["id"])["status"] == "succeeded"
        assert not receiver.calls
        stack.worker()  # its housekeeper finds the owed delivery in the outbox
        wait_until(lambda: receiver.calls, timeout=60, message="the owed webhook")
        headers, body = receiver.calls[0]
        assert headers["X-Gnosis-Event"] == "job.succeeded" and job["id"].encode() in body
        wait_until(lambda: not stack.redis.zcard("gnosis:webhooks:outbox"), timeout=30,
                   message="the outbox to be settled")
        assert len(receiver.calls) == 1
    finally:
        receiver.stop()
