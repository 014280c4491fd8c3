#!/usr/bin/env bash
# The command of a GPU session's device calls, run there in the repository's root with carry [".carry"]
# (made here first by bench/device/prepare.sh). Two calls, in this order:
#   bench/device/run.sh service    the whole service: 512 one-page jobs from 8 clients (issue 18's goal),
#                                  about 4 minutes; first, so that the goal is measured whatever comes after
#   bench/device/run.sh engine     the engine alone, one page's latency, the vision and token checks, and
#                                  a decode step profiled kernel by kernel, about 8 minutes: give it what is
#                                  left of the session's 15 (timeout_s); the JSON is rewritten after each
#                                  section, so a call cut short returns what it measured
# SERVICE_BATCHES=0,64 adds a service run at 64 slots (about 4 more minutes), the default before 2026-12-07. Results and the log go
# to $OUT, named after the card (gpu_engine_h200.json, gpu_engine_h200_service.json, ...), with the service's worker log
# (worker.log: the path each start-up check kept, and why).
set -uo pipefail
what=${1:-service}
out=${OUT:-/tmp/gnosis-bench}
python=${PYTHON:-python3}
mkdir -p "$out"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD" PATH="$PWD/.carry/bin:$PATH" PYTHONUNBUFFERED=1 GNOSIS_BENCH_LOGS="$out"
# Seconds, not minutes, to learn that something is missing.
"$python" -c 'import celery, flask, gevent, gunicorn, pypdfium2, redis, gnosis_ocr.api, gnosis_ocr.worker.tasks' || exit 4
redis-server --version || exit 5
[ "$what" = check ] && { echo "run.sh: ready"; exit 0; }
card=$("$python" -c 'import re, torch; print(re.search(r"[HAB]\d+|L4", torch.cuda.get_device_name(0)).group().lower())') || exit 6
case $what in
  engine)
    # Batches 8 and 64 beside the default one (run twice: prefills beside the steps and on the loop's
    # thread): 1 and 32 took 86 s of the last H200 run, and single_page measures one page alone.
    "$python" bench/gpu_engine.py --sections vision,single_page,engine_alone,mismatches,kernels,decode_attention,float32_mismatches \
      --batches "${ENGINE_BATCHES:-8,64}" --out "$out/gpu_engine_$card.json" 2>&1 | tee "$out/engine_$card.log" ;;
  service)
    "$python" bench/gpu_engine.py --sections service --service-batches "${SERVICE_BATCHES:-0}" \
      --out "$out/gpu_engine_${card}_service.json" 2>&1 | tee "$out/service_$card.log" ;;
  *) echo "run.sh: service, engine or check" >&2; exit 2 ;;
esac
