"""`gnosis-ocr worker` whose GPU "fails" mid-batch, for the engine-death tests.

After GNOSIS_TEST_FAIL_AFTER_STEPS decode steps the device behaves as after a sticky CUDA error: the
step raises and the health probe fails. With GNOSIS_TEST_FAIL_RELEASE, steps go on working and it is
the write that frees a finished page's slot that fails instead. With GNOSIS_TEST_POISON_WIDTH, the first
step with a page of that width in the batch fails so, whatever else is there: a page that kills any
engine it runs on. With GNOSIS_TEST_FAILING_DUTY (reap, expire, reconcile, ...), that housekeeping duty raises
at every pass, as one that meets a record it cannot read. Nothing else of the worker changes.

    GNOSIS_TEST_FAIL_AFTER_STEPS=5 python -m tests.faulty_worker worker
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def patch(after_steps: int, fail_release: bool) -> None:
    from gnosis_ocr.worker.engines.decoder import StaticDecoder

    state = {"steps": 0, "broken": False}
    step, release, healthy = StaticDecoder.step, StaticDecoder.release, StaticDecoder.healthy

    def failing_step(self, batch, length):
        state["steps"] += 1
        if state["steps"] > after_steps:
            state["broken"] = not fail_release
            if not fail_release:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step(self, batch, length)

    def failing_release(self, slot):
        if fail_release and state["steps"] > after_steps:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return release(self, slot)

    StaticDecoder.step = failing_step
    StaticDecoder.release = failing_release
    StaticDecoder.healthy = lambda self: not state["broken"] and healthy(self)


def poison(width: int) -> None:
    from gnosis_ocr.worker.engines.decoder import StaticDecoder
    from gnosis_ocr.worker.engines.nanonets import NanonetsEngine
    from gnosis_ocr.worker.engines.scheduler import Scheduler

    broken = []
    make, launch, healthy = NanonetsEngine._request, Scheduler._launch, StaticDecoder.healthy

    def request(self, page, **kwargs):
        made = make(self, page, **kwargs)
        made.poison = page.size[0] == width
        return made

    def failing_launch(self, active):
        if any(getattr(self.slots[slot], "poison", False) for slot in active):
            broken.append(True)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return launch(self, active)

    NanonetsEngine._request = request
    Scheduler._launch = failing_launch
    StaticDecoder.healthy = lambda self: not broken and healthy(self)


def failing_duty(name: str) -> None:
    from gnosis_ocr.worker.heartbeat import Heartbeat

    def fail(self):
        raise ValueError(f"invalid literal for int() with base 10: b't:0' (the {name} duty)")

    assert hasattr(Heartbeat, f"_{name}"), name
    setattr(Heartbeat, f"_{name}", fail)


if __name__ == "__main__":
    if os.environ.get("GNOSIS_TEST_FAILING_DUTY"):
        failing_duty(os.environ["GNOSIS_TEST_FAILING_DUTY"])
    elif os.environ.get("GNOSIS_TEST_POISON_WIDTH"):
        poison(int(os.environ["GNOSIS_TEST_POISON_WIDTH"]))
    else:
        patch(int(os.environ["GNOSIS_TEST_FAIL_AFTER_STEPS"]), bool(os.environ.get("GNOSIS_TEST_FAIL_RELEASE")))
    from gnosis_ocr.cli import main

    sys.exit(main())
