"""How the soak starts its workers: the CPU engine's (`--engine rapidocr`, tesseract, null), or the GPU path's
batched worker on a tiny Qwen2.5-VL on the CPU (`--engine nanonets`), whose engine may die as after a sticky
CUDA error every so many decode steps (`--engine-death-steps`, through `tests/faulty_worker.py`)."""

from __future__ import annotations

import sys
import threading
import time

import requests


class Workers:
    """Mixed into `Soak`: it owns `args`, `rng`, `stack`, `tmp`, `hub`, `ports` and `ready_again`."""

    def batched_engine(self) -> None:
        """The GPU path's worker on a tiny Qwen2.5-VL: one process, a threads pool, one continuous batch."""
        from harness.hubstub import TINY_REPO, HubStub
        from harness.tinymodel import build_tiny_model

        self.hub = HubStub(TINY_REPO, build_tiny_model(self.tmp / "tiny-model")).start()
        self.stack.env.update(OCR_MODEL_ID=TINY_REPO, HF_ENDPOINT=self.hub.url, OCR_DEVICE="cpu",
                              OCR_MAX_NEW_TOKENS=str(self.args.tokens), OCR_BATCH_SIZE=str(self.args.slots),
                              OCR_REPETITION_WINDOW="0")
        if self.args.prefill_concurrent:  # prefills on a thread of their own beside the steps, as on a GPU
            self.stack.env["OCR_PREFILL_CONCURRENT"] = "on"

    def worker(self):
        from bench.common import free_port

        port = free_port()
        if self.args.engine_death_steps:
            from harness.stack import Proc

            n = self.args.engine_death_steps
            env = {**self.stack.env, "GNOSIS_WORKER_PORT": str(port),
                   "GNOSIS_TEST_FAIL_AFTER_STEPS": str(self.rng.randint(n // 2, n * 3 // 2))}
            proc = Proc([sys.executable, "-m", "tests.faulty_worker", "worker", "--concurrency=1"], env,
                        self.tmp / f"worker-{len(self.stack.procs)}.log")
            self.stack.procs.append(proc)
        else:
            proc = self.stack.worker(concurrency=1, wait_ready=False, GNOSIS_WORKER_PORT=str(port))
        self.ports[proc.pid] = port
        return proc

    def time_until_ready(self, workers: list, since: float) -> None:
        """After a Redis episode: seconds until every live worker's /readyz answers 200 (in a thread)."""
        present = list(workers)  # the workers that lived through it; one killed since no longer counts

        def watch() -> None:
            deadline = since + 180
            while time.monotonic() < deadline:
                ready = 0
                for proc in present:
                    if proc not in workers:
                        ready += 1
                        continue
                    try:
                        ready += requests.get(f"http://127.0.0.1:{self.ports[proc.pid]}/readyz",
                                              timeout=2).status_code == 200
                    except (requests.RequestException, KeyError):
                        pass
                if ready == len(present):
                    self.ready_again.append(round(time.monotonic() - since, 1))
                    return
                time.sleep(0.5)  # polling readiness probes, as a supervisor does
            self.ready_again.append(float("inf"))

        threading.Thread(target=watch, daemon=True).start()
