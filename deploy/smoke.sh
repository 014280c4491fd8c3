#!/usr/bin/env bash
# The compose stack, built and run for real: build the API and CPU worker images from this
# repository's Dockerfiles, start compose's CPU profile (Redis, API, CPU worker), submit
# samples/letter.png with the gnosis-ocr client from outside the containers, check the text, show
# /readyz and /metrics from inside the stack, and tear everything down.
# Docker (compose v2) where there is one; otherwise podman + podman-compose (deploy/podman/).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
say() { printf '== [%3ss] %s\n' "$((SECONDS - started))" "$*"; }

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
  compose=(docker compose --profile cpu)
  services=()
  url=http://127.0.0.1:8080
else
  engine=podman
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"
  # podman-compose >= 1.2 (pip): Debian's 1.0 has no profiles and cannot put a service on the host network.
  compose=("${PODMAN_COMPOSE:-podman-compose}" -p gnosis-smoke --profile cpu -f docker-compose.yml
           -f deploy/podman/compose.override.yml)
  services=()
  url=http://127.0.0.1:8080
fi
GNOSIS_PYTHON="${PYTHON:-python3}"
trap 'say "tearing down"; "${compose[@]}" down -v >/dev/null 2>&1 || true' EXIT

say "building images with $engine"
if [ "$engine" = docker ]; then
  "${compose[@]}" build api worker-cpu
else
  podman build --format docker --network host -q -f Dockerfile.api -t localhost/gnosis-ocr-api . >/dev/null
  podman build --format docker --network host -q -f Dockerfile.worker --target cpu -t localhost/gnosis-ocr-worker-cpu . >/dev/null
  podman build --format docker --network host -q -f deploy/podman/Dockerfile.redis -t localhost/gnosis-ocr-redis . >/dev/null
fi
for image in gnosis-ocr-api gnosis-ocr-worker-cpu; do
  $engine image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "$image" | head -1 | sed 's/^/   image: /'
done

say "starting the CPU profile"
"${compose[@]}" up -d ${services[@]+"${services[@]}"} >/dev/null

say "waiting for the API to be ready (the job below waits for the worker)"
for _ in $(seq 1 120); do
  curl -fsS "$url/readyz" >/dev/null 2>&1 && break
  sleep 1  # polling the stack's readiness; nothing else to wait on from outside
done
curl -fsS "$url/readyz" | sed 's/^/   readyz (from outside): /'

say "submitting samples/letter.png with the gnosis-ocr client, from outside the containers"
out=$("$GNOSIS_PYTHON" -m gnosis_ocr.cli submit --url "$url" --wait --timeout 120 samples/letter.png)
echo "$out" | sed 's/^/   /'
for line in "GNOSIS OCR SAMPLE LETTER" "Invoice number 4821 dated 12 March 2026" "Total amount due: 1,250.00 EUR"; do
  grep -qxF "$line" <<<"$out" || { echo "smoke: missing line: $line" >&2; exit 1; }
done

say "/readyz and /metrics from inside the stack"
api=$($engine ps --format '{{.Names}}' | grep -m1 'api')
worker=$($engine ps --format '{{.Names}}' | grep -m1 'worker-cpu')
inside() {  # GET a URL from inside a container of the stack
  $engine exec "$1" python -c "import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=5).read().decode().strip())" "$2"
}
inside "$api" http://127.0.0.1:8080/readyz | sed 's/^/   api readyz (inside): /'
for _ in $(seq 1 60); do  # every pool process of the worker has its engine loaded
  inside "$worker" http://127.0.0.1:9808/readyz 2>/dev/null | sed 's/^/   worker readyz (inside): /' | grep . && break
  sleep 1
done
inside "$api" http://127.0.0.1:8080/metrics | grep -E '^gnosis_(jobs_finished_total|pages_processed_total|queue_depth)' | sed 's/^/   /'
say "smoke test passed"
