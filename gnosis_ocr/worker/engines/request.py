"""One page on its way through a scheduler: its inputs, limits, tokens and how it ended."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ...errors import PageTimeout
from . import Cancelled, StopReason
from .repetition import Repetition


@dataclass(eq=False)
class Request:
    """One page on its way through a scheduler; the submitting thread waits on `done`."""

    inputs: dict
    length: int
    max_new_tokens: int
    deadline: float | None = None
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    tokens: list[int] = field(default_factory=list)
    stop_reason: StopReason | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    resolutions: int = 0
    """How often the scheduler resolved this request: exactly once, whatever raised where."""
    watch: Repetition | None = None
    deaths: int = 0
    """Engine deaths this page was on a device for, as its job's record counts them (`admission.py`)."""
    _cancel: bool = False

    def cancel(self) -> None:
        self._cancel = True

    @property
    def truncated(self) -> bool:
        return self.stop_reason is not None and self.stop_reason.truncated

    @property
    def unwanted(self) -> BaseException | None:
        """Why the page should leave now: cancelled, or over its deadline."""
        if self._cancel:
            return Cancelled()
        if self.deadline is not None and time.monotonic() > self.deadline:
            return PageTimeout(f"The page was stopped after {time.monotonic() - self.submitted:.0f} seconds, "
                               "over its time limit.")
        return None
