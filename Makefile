# Developer entry points. The README has the same commands spelled out.
.PHONY: test bench bench-gpu demo

test:
	python -m pytest -n auto --dist loadfile

# Benchmarks 1-5 (2 to 4 minutes on 2 cores); results land in docs/results/*.json.
bench:
	GNOSIS_BENCH_OUT=docs/results python -m bench.queue_overhead
	GNOSIS_BENCH_OUT=docs/results python -m bench.submit_throughput
	GNOSIS_BENCH_OUT=docs/results python -m bench.scaling
	GNOSIS_BENCH_OUT=docs/results python -m bench.download_once
	GNOSIS_BENCH_OUT=docs/results python -m bench.warm_start

# Only where CUDA exists; about 7 minutes on an H100/H200 (`--tiny` checks it on a CPU).
bench-gpu:
	mkdir -p docs/results
	python bench/gpu_engine.py --out docs/results/gpu_engine.json

demo:
	gnosis-ocr dev --submit samples/letter.png
