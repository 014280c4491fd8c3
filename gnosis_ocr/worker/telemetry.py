"""This worker process's own metrics, summed over its pool processes by the probe's /metrics.

Created on first use, not at import: prometheus-client picks its multiprocess mode when a metric is
made, and PROMETHEUS_MULTIPROC_DIR is set by the worker's start-up, after its modules are imported.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Telemetry:
    pages: Any
    """gnosis_worker_pages_total{outcome}: pages this worker finished."""
    page_seconds: Any
    in_flight: Any
    model_load: Any
    batch_active: Any
    """Pages in a device's batch at its last step; rate(decode_tokens) / rate(decode_steps) is the mean
    occupancy over any window."""
    batch_slots: Any
    device_info: Any
    """1 for each device, labelled with the attention paths its start-up checks kept."""
    decode_steps: Any
    decode_tokens: Any
    decode_seconds: Any
    prefills: Any
    """Prefills run: prefill_pages / prefills is the mean chunk (OCR_PREFILL_BATCH, OCR_PREFILL_GATHER_MS)."""
    prefill_pages: Any
    prefill_seconds: Any
    """With decode_seconds: where a device's time goes, prefills (the vision tower and the prompt) against
    decode steps; the two run one after the other on the device's loop."""


_telemetry: Telemetry | None = None
_lock = threading.Lock()


def get() -> Telemetry:
    global _telemetry
    with _lock:
        if _telemetry is None:
            from prometheus_client import Counter, Gauge, Histogram

            from ..metrics import HISTOGRAMS

            _telemetry = Telemetry(
                pages=Counter("gnosis_worker_pages_total", "Pages this worker finished, by outcome.", ["outcome"]),
                page_seconds=Histogram("gnosis_worker_page_seconds", "Page latency in this worker.",
                                       buckets=HISTOGRAMS["gnosis_page_duration_seconds"][1]),
                in_flight=Gauge("gnosis_worker_pages_in_flight", "Pages being processed now.",
                                multiprocess_mode="livesum"),
                model_load=Gauge("gnosis_worker_model_load_seconds", "Seconds the engine took to load.",
                                 multiprocess_mode="max"),
                batch_active=Gauge("gnosis_worker_batch_active", "Pages in the device's batch at the last step.",
                                   ["device"], multiprocess_mode="livemax"),
                batch_slots=Gauge("gnosis_worker_batch_slots", "Pages the device's batch holds.", ["device"],
                                  multiprocess_mode="livemax"),
                device_info=Gauge("gnosis_worker_device_info", "A device of this worker (always 1), labelled with "
                                  "the attention its decode steps use (flash or sdpa), its vision tower's (batched "
                                  "or windows), its patch embedding (linear or conv3d), its decode step's q/k/v and "
                                  "gate/up projections (stacked: one GEMM each, or apart), RMSNorm (fused, exact "
                                  "or module) and prefills (concurrent: beside the decode steps, or serial), as its "
                                  "settings and start-up checks decided.",
                                  ["device", "decode_attention", "vision_attention", "patch_embed", "projections",
                                   "norm", "prefill"],
                                  multiprocess_mode="livemax"),
                decode_steps=Counter("gnosis_worker_decode_steps_total", "Decode steps run.", ["device"]),
                decode_tokens=Counter("gnosis_worker_decode_tokens_total", "Tokens decoded (one per page per step).",
                                      ["device"]),
                decode_seconds=Counter("gnosis_worker_decode_seconds_total", "Seconds the device spent in decode "
                                       "steps.", ["device"]),
                prefills=Counter("gnosis_worker_prefills_total", "Prefills run (one forward pass each, of one page "
                                 "or a chunk of pages of one prompt length).", ["device"]),
                prefill_pages=Counter("gnosis_worker_prefill_pages_total", "Pages prefilled (vision tower and "
                                      "prompt) into the device's batch.", ["device"]),
                prefill_seconds=Counter("gnosis_worker_prefill_seconds_total", "Seconds the device spent "
                                        "prefilling, during which no page of its batch decodes.", ["device"]),
            )
        return _telemetry
