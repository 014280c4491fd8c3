"""The live workers, as their heartbeat records in Redis say: `gnosis-ocr workers`.

A worker is alive while its record exists (it expires three missed beats after the last, on Redis's clock),
so this lists exactly the workers the reaper would not requeue. Each record says where the worker runs,
its role (`pages`, or `light`: the webhooks, cache warm-ups and batch listings a page worker starts beside
itself), its engine, whether every pool process has it loaded, and for a batched (GPU) worker each device's
slots and the paths its start-up checks kept; beside it, the pages the worker holds now (its in-flight hash).
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

import redis

from . import keys


def workers(client: redis.Redis) -> list[dict]:
    """Every live worker's record, with its `id`, `ready` and `in_flight`, by host then id."""
    ids = [(k.decode() if isinstance(k, bytes) else k).removeprefix(keys.worker(""))
           for k in client.scan_iter(keys.WORKER_RECORDS, count=1000) if keys.is_worker_record(k)]
    pipe = client.pipeline(transaction=False)  # one round trip for every record and in-flight count
    for worker in ids:
        pipe.get(keys.worker(worker))
        pipe.hlen(keys.worker_inflight(worker))
    replies = pipe.execute() if ids else []
    found = []
    for worker, raw, in_flight in zip(ids, replies[::2], replies[1::2], strict=True):
        if raw is None:  # expired between the scan and the read
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        # A light worker (webhooks, cache warm-ups, batch listings) loads no engine: its record is its readiness.
        ready = record.get("engines_loaded", 0) >= record.get("concurrency", 1) and "engine_dead" not in record
        found.append({"id": worker, **record, "ready": ready, "in_flight": in_flight})
    return sorted(found, key=lambda w: (w.get("host", ""), w["id"]))


def print_table(rows: list[dict], out: TextIO = sys.stdout) -> None:
    """One line per worker, aligned; a batched worker's devices as
    `device: slots, decode/vision/embed/projections/norm/prefill` (the paths its settings and start-up checks
    kept)."""
    header = ("WORKER", "HOST", "ENGINE", "READY", "IN FLIGHT", "STARTED", "DEVICES")
    lines = [header] + [(
        w["id"], str(w.get("host", "")), "(light)" if w.get("role") == "light" else str(w.get("engine", "")),
        "dead" if "engine_dead" in w else ("yes" if w["ready"] else "loading"),
        str(w["in_flight"]), str(w.get("started_at", "")), _devices(w.get("devices") or {}))
        for w in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip(), file=out)


def _devices(devices: dict) -> str:
    return "; ".join(f"{name}: {d.get('slots')} slots, {d.get('decode_attention')}/{d.get('vision_attention')}/"
                     f"{d.get('patch_embed')}/{d.get('projections')}/{d.get('norm')}/{d.get('prefill')}"
                     for name, d in devices.items())
