#!/usr/bin/env bash
# The compose stack, built and run for real: build the API and CPU worker images from this
# repository's Dockerfiles, start compose's CPU profile (Redis, API, CPU worker), submit
# samples/letter.png with curl from outside the containers (the host needs nothing but a container
# engine and curl), check the text, show
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

say "submitting samples/letter.png with curl, from outside the containers"
# curl and the HTTP API alone: the host needs a container engine and nothing of Python.
job=$(curl -fsS -F "file=@samples/letter.png" "$url/v1/jobs")
id=$(sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' <<<"$job")
[ -n "$id" ] || { echo "smoke: no job id in: $job" >&2; exit 1; }
echo "   job $id accepted"
status=queued
for _ in $(seq 1 8); do  # each call long-polls up to 15 s (?wait), so no sleep is needed
  status=$(curl -fsS "$url/v1/jobs/$id?wait=15" | sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p')
  case "$status" in succeeded|failed|cancelled) break ;; esac
done
[ "$status" = succeeded ] || { echo "smoke: job $id ended $status" >&2; curl -sS "$url/v1/jobs/$id" >&2; exit 1; }
out=$(curl -fsS "$url/v1/jobs/$id/result?format=markdown")
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
