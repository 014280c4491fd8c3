"""What the tests and the benchmarks share: real processes (`stack`), a private Redis and Sentinel
group (`redisproc`), the stand-in hub and the tiny model it serves (`hubstub`, `tinymodel`), the GCS
emulator (`gcsemulator`) and generated documents (`docs`). Not shipped in the package."""

from .stack import ROOT, TEST_REDIS_URL, Proc, Stack, free_port, poll_job, wait_until

__all__ = ["ROOT", "TEST_REDIS_URL", "Proc", "Stack", "free_port", "poll_job", "wait_until"]
