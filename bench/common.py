"""Shared helpers for the benchmarks: processes from the test harness, percentiles, output."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.redisproc import PrivateRedis  # noqa: E402
from harness.stack import Stack, free_port, wait_until  # noqa: E402  (the same real processes as the tests)

__all__ = ["Stack", "PrivateRedis", "free_port", "wait_until", "percentile", "report", "private_stack"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def report(name: str, result: dict, table: list[list]) -> None:
    """One JSON line (machines), then a table (people)."""
    print(json.dumps({"bench": name, **result}), flush=True)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * width for width in widths))
    out = os.environ.get("GNOSIS_BENCH_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps({"bench": name, **result}, indent=1))


def private_stack(appendonly: bool = False) -> tuple[Stack, PrivateRedis]:
    """A Stack on its own redis-server, so a benchmark neither sees nor disturbs anything else."""
    tmp = Path(tempfile.mkdtemp(prefix="gnosis-bench-"))
    redis_proc = PrivateRedis(tmp / "redis", appendonly=appendonly).start()
    stack = Stack(tmp, redis_proc.url)
    stack.env["GNOSIS_ACCESS_LOG"] = "off"  # keep logging out of the measurement
    stack.env["GNOSIS_LOG_LEVEL"] = "WARNING"
    return stack, redis_proc
