"""The per-bucket circuit breaker of a worker's page threads (worker/breaker.py), on a clock the test
moves: while a bucket fails for now, one thread at a time calls it and the others give up at once."""

from __future__ import annotations

import pytest

from gnosis_ocr.worker import breaker
from gnosis_ocr.worker.breaker import Breaker, Open


class Unavailable(Exception):
    """What the storage client raises while a bucket fails for now (503, after its retries)."""


class Refused(Exception):
    """What it raises when the bucket answers, with a refusal (403)."""


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(breaker.time, "monotonic", lambda: now[0])
    return now


def make(rest: float = 0.0) -> Breaker:
    return Breaker(lambda exc: isinstance(exc, Unavailable), rest=rest)


def fail(b: Breaker, key: str = "scans", exc: BaseException | None = None) -> None:
    with pytest.raises(type(exc or Unavailable())), b.call(key, hold=60):
        raise exc or Unavailable()


def refused(b: Breaker, key: str = "scans") -> bool:
    """Whether a call to `key` now would be refused (one that is let through succeeds)."""
    try:
        with b.call(key, hold=60):
            return False
    except Open:
        return True


def test_a_bucket_that_answers_lets_every_thread_through_at_once(clock):
    b = make()
    with b.call("scans", hold=60), b.call("scans", hold=60):
        pass  # two calls at once, neither refused
    assert not b.failing("scans")


def test_while_a_bucket_fails_one_thread_probes_it_and_the_others_are_refused_at_once(clock):
    b = make()
    fail(b)
    with b.call("scans", hold=60):  # the probe
        assert refused(b) and b.refusing("scans")  # a caller can tell before it does any work for the call
        assert not refused(b, "other") and not b.refusing("other")  # another bucket is not held up
    assert not b.failing("scans")  # the probe got an answer: everyone calls again
    with b.call("scans", hold=60), b.call("scans", hold=60):
        pass


def test_a_probe_that_fails_again_lets_the_next_thread_probe_at_once(clock):
    b = make()
    fail(b)
    fail(b)  # the probe, failing
    assert not refused(b)  # reads: the next probe without waiting


def test_writes_rest_between_probes(clock):
    b = make(rest=120)
    fail(b)
    assert refused(b)
    clock[0] += 121
    assert not refused(b)


def test_a_refusal_is_an_answer_and_closes_the_breaker(clock):
    b = make()
    fail(b)
    fail(b, exc=Refused())  # the probe: the bucket answered 403
    assert not b.failing("scans")


def test_an_interrupted_probe_lets_another_thread_probe_and_keeps_the_bucket_failing(clock):
    b = make()
    fail(b)
    fail(b, exc=KeyboardInterrupt())  # a time limit, a shutdown: nothing learnt of the bucket
    assert b.failing("scans")
    assert not refused(b)


def test_a_probe_lost_without_a_word_holds_the_others_out_only_for_its_hold(clock):
    b = make()
    fail(b)
    lost = b.call("scans", hold=60)
    lost.__enter__()  # a thread that never comes back
    assert refused(b)
    clock[0] += 61
    assert not refused(b)


def test_the_housekeeper_writes_whatever_the_page_threads_may_do(clock):
    b = make(rest=120)
    fail(b)
    with b.call("scans", hold=60, force=True):
        pass
    assert not b.failing("scans")


def test_a_call_begun_before_the_bucket_failed_leaves_the_probe_alone(clock):
    b = make()
    early = b.call("scans", hold=60)
    early.__enter__()  # under way when the bucket begins to fail
    fail(b)
    with b.call("scans", hold=60):  # the probe
        assert early.__exit__(Unavailable, Unavailable(), None) is False  # it fails too, and is not swallowed
        assert refused(b)  # still the only thread calling
