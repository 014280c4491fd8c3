"""When the worker counts as shutting down: waits that hold Celery's loop give way then (a SIGTERM
during an out-of-memory episode must still stop the worker)."""

from __future__ import annotations

from celery.worker import state

from gnosis_ocr.worker import loopwatch


def test_a_warm_shutdown_counts_though_its_exit_code_is_zero(monkeypatch):
    monkeypatch.setattr(state, "should_stop", None)
    monkeypatch.setattr(state, "should_terminate", None)
    assert not loopwatch.stopping()
    # Celery's SIGTERM handler sets the exit code (EX_OK): read as a truth value, the wait went on, and
    # the worker outlived its supervisor's grace period (1 run in 8 under load).
    monkeypatch.setattr(state, "should_stop", 0)
    assert loopwatch.stopping()
    monkeypatch.setattr(state, "should_stop", None)
    monkeypatch.setattr(state, "should_terminate", 1)
    assert loopwatch.stopping()
