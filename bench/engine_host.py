"""How long a GPU sits idle between decode steps because of the host: the engine loop's own Python, and
the worker's page threads that share its GIL.

On a GPU the loop thread waits for each step without the GIL (the CUDA sync inside `.tolist()`), and
needs it back the moment the step ends. Meanwhile the worker's page threads hold it: decoding a PNG,
the image processor's resize and normalise (5,888 patches of an A4 page), polling Redis for
cancellations. CPython hands the GIL to a waiting thread only when the holder releases it or after
`sys.getswitchinterval()` (5 ms by default): next to a step of 7-9 ms, that is the difference
between a busy GPU and a half-idle one. None of this needs a GPU to measure.

Here the real `Scheduler` (slots, repetition guard, deadlines, metrics hook) drives a stand-in device
whose step and prefill take the H200's measured times as GIL-free waits, as a CUDA sync does, and
returns tokens; page threads do what a page's thread does in the worker (decode the PNG, build the
model's inputs with Qwen2.5-VL's real processor at 1280 px, hand them over, wait polling a real
Redis), in a closed loop of `slots + prefetch` threads. Each mode reports the device's busy share
(simulated device time ÷ wall time) and the host's milliseconds per step.

    python bench/engine_host.py --out docs/results/engine_host.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.gpu_engine import MIX, build_processor  # noqa: E402
from bench.gpu_throughput import a4_page  # noqa: E402


class Launched:
    """A step queued on the stand-in: its tokens, and when the device will have computed them."""

    def __init__(self, tokens, event: float) -> None:
        self.tokens, self.event = tokens, event


class DeviceStandIn:
    """What the scheduler needs of a `StaticDecoder`, with the H200's times instead of kernels: a step
    of `b` pages takes `step_ms(b)`, a prefill `prefill_ms` per page, both waited for without the GIL."""

    def __init__(self, slots: int, *, step_ms: tuple[float, float], prefill_ms: float, vocab: int = 150_000,
                 launches: int = 0, chunk_ms: float = 0.0, contention: float = 1.0, launch_us: float = 0.0) -> None:
        import torch

        self.slots = slots
        self.max_len = 8192
        # "meta": the pixels a chunk joins on the device cost no copy here, as on a GPU, where they cross
        # to it page by page whatever the chunk (on the CPU a 4-page chunk's join is a 55 MB copy on the
        # loop's thread, which a GPU host does not make).
        self.device = torch.device("meta")
        self.captures = 0
        self.step_ms, self.prefill_ms = step_ms, prefill_ms
        self.chunk_ms = chunk_ms  # a prefill's cost whatever its pages: the host's launches and reads
        # What a worker reports of a real decoder's paths (`gnosis_worker_device_info`).
        self.attention = self.rms_path = "stand-in"
        self.stacked = None
        self.device_seconds = 0.0
        self.free_at = 0.0
        self.step_device_seconds = 0.0
        self.vocab = vocab
        self._torch = torch
        self._generator = torch.Generator().manual_seed(0)
        self.launches = launches
        self.launch_s = launch_us / 1e6  # Python run with the GIL held before each launch (a module's call)
        """Calls from Python per prefill: a forward pass is not one graph replay but thousands of calls
        (Qwen2.5-VL-3B's through the engine: 4,520 for one page, 4,680 for three), and each lets go of
        the GIL and must take it back while the page threads want it. 0: one wait, as if it were free."""
        self._one = torch.ones(1)
        self._out = torch.empty(1)
        # A prefill on a stream of its own (OCR_PREFILL_CONCURRENT) shares the device with the steps: while
        # both run, each goes at `rate` of its own speed. 0 contention: both at full speed (the prefill's
        # GEMMs fill what the steps' memory-bound kernels leave idle); 1: half each, no better than one
        # after the other. A real GPU is somewhere between; the GPU benchmark measures where.
        self.rate = (2 - contention) / 2
        self.side_free_at = 0.0

    def step_seconds(self, b: int) -> float:
        one, full = self.step_ms  # measured: 7.05 ms for 1 page, 8.87 ms for 64 (docs/benchmarks.md)
        return (one + (full - one) * (b - 1) / 63) / 1000

    def _queue(self, seconds: float) -> float:
        """Work queued behind what the device already has, as on a CUDA stream; when it will be done."""
        self.device_seconds += seconds
        self.free_at = max(time.monotonic(), self.free_at) + seconds
        return self.free_at

    def launch(self, batch: int, length: int) -> Launched:
        seconds = self.step_seconds(batch)
        self.step_device_seconds += seconds
        if max(time.monotonic(), self.free_at) < self.side_free_at:  # a prefill runs beside it
            seconds /= self.rate
        # A GPU hands back a tensor too: `.tolist()` on it is the loop's cost, the draw here is not.
        tokens = self._torch.randint(self.vocab, (batch,), generator=self._generator)
        return Launched(tokens, self._queue(seconds))

    @staticmethod
    def collect(launched: Launched) -> list[int]:
        _wait_until(launched.event)
        return launched.tokens.tolist()

    def step(self, batch: int, length: int):
        launched = self.launch(batch, length)
        _wait_until(launched.event)
        return launched.tokens

    def forward(self, pages, *, stream=None) -> list[int]:
        seconds = (self.chunk_ms + self.prefill_ms * len(pages)) / 1000
        if stream is None:  # behind the steps on their queue
            done = self._queue(seconds)
        else:
            self.device_seconds += seconds
            self.side_free_at = done = max(time.monotonic(), self.side_free_at) + seconds / self.rate
        for _ in range(self.launches):  # as a kernel launch: the GIL let go and taken back
            if self.launch_s:
                until = time.perf_counter() + self.launch_s
                while time.perf_counter() < until:  # the Python around a call, holding the GIL
                    pass
            self._torch.add(self._one, self._one, out=self._out)
        _wait_until(done)  # its first tokens are read at once
        return self._torch.randint(self.vocab, (len(pages),), generator=self._generator).tolist()

    def seat(self, slots, firsts: list[int], rows=None) -> list[int]:
        self._queue(0.0003)  # 72 copies into the cache, behind the step in flight
        return [firsts[r] for r in rows] if rows is not None else firsts[:len(slots)]

    @staticmethod
    def side_stream() -> str:
        return "side"

    def release(self, slot: int) -> None:
        pass

    def pause(self, slots) -> None:
        pass

    def resume(self, slots) -> None:
        pass

    def healthy(self) -> bool:
        return True

    def free_memory(self) -> None:
        pass

    def bind_thread(self, *, steps: bool = False) -> None:
        pass


def _wait_until(when: float) -> None:
    left = when - time.monotonic()
    if left > 0:
        time.sleep(left)  # without the GIL, as a CUDA sync


def page_png(max_side: int) -> bytes:
    buf = io.BytesIO()
    a4_page(max_side).save(buf, format="PNG")
    return buf.getvalue()


def _synchronous():
    from gnosis_ocr.worker.engines.scheduler import Scheduler

    class Synchronous(Scheduler):
        """The same loop, each step read before the next is launched: the baseline."""

        def _decode(self) -> None:
            super()._decode()
            self._settle()

    return Synchronous


def run_mode(name: str, *, prepare: bool, overlap: bool, switch: float | None, slots: int, prefetch: int,
             seconds: float, step_ms: tuple[float, float], prefill_ms: float, prompt, png: bytes,
             redis_url: str, launches: int = 0, chunk_ms: float = 0.0, gather: float = 0.0,
             concurrent: bool = False, contention: float = 1.0, launch_us: float = 0.0) -> dict:
    import redis
    import torch
    from PIL import Image

    from gnosis_ocr.worker.engines.repetition import RepetitionGuard
    from gnosis_ocr.worker.engines.request import Request
    from gnosis_ocr.worker.engines.scheduler import Scheduler
    from gnosis_ocr.worker.runtime import _record_work

    Synchronous = _synchronous()

    def inputs() -> dict:
        with Image.open(io.BytesIO(png)) as img:
            page = img.convert("RGB")
        made = prompt.inputs(page)
        made["pixel_values"] = made["pixel_values"].to(torch.bfloat16)  # as NanonetsEngine._request does
        return made

    ready = inputs()
    device = DeviceStandIn(slots, step_ms=step_ms, prefill_ms=prefill_ms, launches=launches, chunk_ms=chunk_ms,
                           contention=contention, launch_us=launch_us)
    guard = RepetitionGuard(512, max_tokens=4096)
    loop = Scheduler if overlap else Synchronous
    scheduler = loop(device, eos_ids=set(), prefill_batch=4, gather=gather, guard=guard,
                     on_work=lambda phase, pages, secs: work(phase, pages, secs), concurrent=concurrent)
    prefilled = [0]
    chunks: dict[int, int] = {}  # prefills by pages, once the batch is full

    def work(phase: str, pages: int, seconds: float) -> None:  # the worker's metrics hook, and a count
        if phase == "prefill":
            prefilled[0] += pages
            if full.is_set():
                chunks[pages] = chunks.get(pages, 0) + 1
        _record_work("cuda:0", phase, pages, seconds)

    client = redis.Redis.from_url(redis_url, max_connections=1000)  # as the worker's: a thread each
    client.hset("gnosis-bench:job", "status", "running")
    lengths = itertools.cycle(MIX)
    lock = threading.Lock()
    stop, full = threading.Event(), threading.Event()
    done_pages, prepare_seconds, first_tokens = [], [], []

    def page_thread() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            made = inputs() if prepare else dict(ready)
            prepare_seconds.append(time.perf_counter() - started)
            with lock:
                cap = next(lengths)
            request = Request(made, length=made["input_ids"].shape[1], max_new_tokens=cap)
            request.deadline = time.monotonic() + 600
            scheduler.submit(request)
            while not request.done.wait(0.25):  # as NanonetsEngine.recognize polls for a cancellation
                client.hget("gnosis-bench:job", "status")
            if request.error is None:
                done_pages.append(time.monotonic())
                if full.is_set():
                    first_tokens.append(request.first_token - request.submitted)

    previous = sys.getswitchinterval()
    if switch is not None:
        sys.setswitchinterval(switch)
    threads = [threading.Thread(target=page_thread, daemon=True) for _ in range(slots + prefetch)]
    try:
        scheduler.start()
        for t in threads:
            t.start()
        # Measure only once the batch is full: the ramp is the same in every mode.
        deadline = time.monotonic() + 120
        while scheduler._in_flight() < slots and time.monotonic() < deadline:
            time.sleep(0.05)
        full.set()
        warm = (scheduler.steps, scheduler.step_seconds, scheduler.prefill_seconds, device.device_seconds,
                device.step_device_seconds, scheduler.tokens, len(done_pages), prefilled[0], time.monotonic())
        time.sleep(seconds)
        end = (scheduler.steps, scheduler.step_seconds, scheduler.prefill_seconds, device.device_seconds,
               device.step_device_seconds, scheduler.tokens, len(done_pages), prefilled[0], time.monotonic())
    finally:
        stop.set()
        scheduler.stop()
        sys.setswitchinterval(previous)
        client.delete("gnosis-bench:job")
    deltas = (b - a for a, b in zip(warm, end, strict=True))
    steps, step_s, prefill_s, device_s, step_device_s, tokens, pages, prefills, wall = deltas
    host = wall - device_s
    result = {
        "mode": name, "prepare_pages": prepare, "overlap": overlap, "switch_interval_ms": (switch or previous) * 1000,
        "chunk_ms": chunk_ms, "gather_s": gather, "concurrent": concurrent,
        "contention": contention if concurrent else None,
        "seconds": round(wall, 2), "steps": steps, "pages_finished": pages, "tokens": tokens,
        "mean_batch": round(tokens / max(steps, 1), 1),
        "device_busy": round(device_s / wall, 3),
        "host_ms_per_step": round(host / max(steps, 1) * 1000, 2),
        # Time inside `step` past the device's own: the GIL taken back late after the wait.
        "step_overrun_ms": round((step_s - step_device_s) / max(steps, 1) * 1000, 2),
        "prefill_share": round(prefill_s / wall, 3),
        # The loop's time per page prefilled, against the device's own `prefill_ms`: the difference is
        # the host's (joining the chunk, waiting for the step in flight, taking the GIL back).
        "prefill_ms_per_page": round(1000 * prefill_s / max(prefills, 1), 1),
        "output_tokens_per_s": round(tokens / wall),
        "pages_per_s": round(pages / wall, 2),
        "prefills_by_pages": dict(sorted(chunks.items())),
        # From submit to the first token: the queue's wait, any gathering and the prefill.
        "first_token_s": round(sum(first_tokens) / max(len(first_tokens), 1), 2),
        "prepare_ms_per_page": round(1000 * sum(prepare_seconds) / max(len(prepare_seconds), 1), 1),
    }
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=4, help="GNOSIS_PREFETCH_PAGES: page threads beyond the slots")
    parser.add_argument("--seconds", type=float, default=20, help="measured per mode, once the batch is full")
    parser.add_argument("--step-ms", default="7.05,8.87", help="a step of 1 and of 64 pages (H200, measured)")
    parser.add_argument("--prefill-ms", type=float, default=60, help="per page (the issue's goal; 159 measured)")
    parser.add_argument("--prefill-launches", type=int, default=0,
                        help="calls from Python per prefill chunk, each letting go of the GIL (4,520 measured)")
    parser.add_argument("--launch-us", type=float, default=0,
                        help="Python run holding the GIL before each of --prefill-launches (a module's call "
                             "around its kernel: about 15 us in a real forward)")
    parser.add_argument("--chunk-ms", type=float, default=0,
                        help="a prefill's cost whatever its pages (the host's launches, reads), beside --prefill-ms")
    parser.add_argument("--gather", default="0",
                        help="OCR_PREFILL_GATHER_MS values, comma-separated: each mode runs once with each")
    parser.add_argument("--concurrent", default="0",
                        help="OCR_PREFILL_CONCURRENT off (0) and on (1), comma-separated: each mode runs with each")
    parser.add_argument("--contention", default="1",
                        help="with prefills concurrent: how much the prefill and the steps slow each other, 0 (not "
                             "at all) to 1 (half speed each while both run); comma-separated")
    parser.add_argument("--max-side", type=int, default=1280)
    parser.add_argument("--redis-url", default=os.environ.get("GNOSIS_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--modes", default="alone_sync,alone,pages_sync,pages",
                        help="alone: inputs made once; pages: made per page on the page threads; _sync: each step "
                             "read before the next is launched (the loop before 2026-12-07)")
    parser.add_argument("--switch-ms", type=float, help="sys.setswitchinterval for the run (default: Python's)")
    parser.add_argument("--out")
    args = parser.parse_args()

    from gnosis_ocr.worker.engines.prompt import PagePrompt

    prompt = PagePrompt(build_processor())
    png = page_png(args.max_side)
    step_ms = tuple(float(x) for x in args.step_ms.split(","))
    import subprocess

    import gnosis_ocr

    code = os.path.dirname(os.path.dirname(os.path.abspath(gnosis_ocr.__file__)))
    commit = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    report = {"bench": "engine_host", "code": code, "commit": commit.stdout.strip() or None,
              "python": platform.python_version(), "cpus": os.cpu_count(),
              "slots": args.slots, "prefetch": args.prefetch, "step_ms": step_ms, "prefill_ms": args.prefill_ms,
              "prefill_launches": args.prefill_launches, "launch_us": args.launch_us, "chunk_ms": args.chunk_ms,
              "prompt_tokens": int(prompt.inputs(a4_page(args.max_side))["input_ids"].shape[1]), "modes": []}
    # Contention is a property of concurrent prefills only: serial runs take one setting, not one each.
    ways = [(c == "1", float(x)) for c in args.concurrent.split(",")
            for x in (args.contention.split(",") if c == "1" else ["1"])]
    runs = [(name, gather, *way) for way in ways for name in args.modes.split(",") for gather in args.gather.split(",")]
    for name, gather, concurrent, contention in runs:
        prepare, overlap = name.startswith("pages"), not name.endswith("_sync")
        switch = args.switch_ms / 1000 if args.switch_ms else None
        report["modes"].append(run_mode(name, prepare=prepare, overlap=overlap, switch=switch, slots=args.slots,
                                        prefetch=args.prefetch, seconds=args.seconds, step_ms=step_ms,
                                        prefill_ms=args.prefill_ms, prompt=prompt, png=png,
                                        redis_url=args.redis_url, launches=args.prefill_launches,
                                        chunk_ms=args.chunk_ms, gather=float(gather) / 1000,
                                        concurrent=concurrent, contention=contention,
                                        launch_us=args.launch_us))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
