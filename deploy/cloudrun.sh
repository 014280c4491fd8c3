#!/usr/bin/env bash
# Deploy gnosis-ocr on Cloud Run: the API as a service, GPU workers as a worker pool, the model cache
# in a GCS bucket mounted with Cloud Storage FUSE at /cache, Redis on Memorystore.
# The model is warmed into the bucket by a Cloud Run job BEFORE the workers roll out (see docs/deploy.md).
#
#   PROJECT=my-proj REGION=europe-west4 BUCKET=my-models REDIS_URL=redis://10.0.0.3:6379/0 \
#   NETWORK=default SUBNET=default ./deploy/cloudrun.sh
#
# AUTOSCALE=1 also deploys CREMA, which scales the worker pool on the pages waiting (deploy/crema.yaml).
# ACCEPT_REPLICAS=0 answers 202 on the primary alone, without waiting for Memorystore's replica.
# ALERTS=0 leaves out the alert policies (Cloud Monitoring, made once from deploy/prometheus/alerts.yml).
# WORKER_METRICS=1 runs a collector beside each GPU worker for its own metrics (deploy/rungmp-worker.yaml).
#
# Needs a gcloud whose `beta run worker-pools deploy` has --gpu, --gpu-type and --instances: Google Cloud
# SDK 528.0.0 has none of them (it has --scaling and no GPU). The script checks before it changes anything.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}" "${REDIS_URL:?set REDIS_URL}"
NETWORK="${NETWORK:-default}"
SUBNET="${SUBNET:-default}"
TAG="${TAG:-$(git rev-parse --short HEAD)}"
REPO="${REPO:-$REGION-docker.pkg.dev/$PROJECT/gnosis-ocr}"
OCR_MODEL_ID="${OCR_MODEL_ID:-nanonets/Nanonets-OCR-s}"
# Pin a commit sha in production: every worker then loads exactly the bytes that were warmed.
OCR_MODEL_REVISION="${OCR_MODEL_REVISION:-main}"
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"
WORKERS="${WORKERS:-2}"
AUTOSCALE="${AUTOSCALE:-0}"
ALERTS="${ALERTS:-1}"
WORKER_METRICS="${WORKER_METRICS:-0}"
# Memorystore's Standard tier keeps one replica: the API answers 202 only once it has the job, so a
# failover loses nothing accepted; while it is rebuilt after one, the new primary accepts on its own.
ACCEPT_REPLICAS="${ACCEPT_REPLICAS:-connected}"
# Google's collector for Managed Service for Prometheus on Cloud Run (GoogleCloudPlatform/run-gmp-sidecar).
GMP_SIDECAR="${GMP_SIDECAR:-us-docker.pkg.dev/cloud-ops-agents-artifacts/cloud-run-gmp-sidecar/cloud-run-gmp-sidecar:1.2.0}"

# One clear line and nothing deployed when this gcloud cannot create a worker pool with a GPU.
check_gcloud() {
  command -v gcloud >/dev/null || { echo "cloudrun.sh: gcloud is not on PATH (https://cloud.google.com/sdk/docs/install)" >&2; exit 1; }
  local version help missing=""
  version=$(gcloud version --format='value("Google Cloud SDK")' 2>/dev/null || echo unknown)
  help=$(gcloud beta run worker-pools deploy --help 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' || true)
  for flag in --gpu= --gpu-type= --instances= gpu-zonal-redundancy; do
    grep -qF -- "$flag" <<<"$help" || missing="$missing ${flag%=}"
  done
  if [ -n "$missing" ]; then
    echo "cloudrun.sh: gcloud $version cannot deploy GPU worker pools (its 'beta run worker-pools deploy' lacks:$missing); run 'gcloud components update' and try again" >&2
    exit 1
  fi
}
check_gcloud

# Mount options for loading multi-GB safetensors from the bucket (docs/deploy.md explains each):
#  implicit-dirs                       the hub layout's folders exist only as object prefixes
#  metadata-cache-ttl-secs=60          stat results cached a minute; our manifest wait covers the lag
#  metadata-cache-negative-ttl-secs=0  never cache "not found": a freshly published manifest is seen at once
#  file-cache-max-size-mb=-1           keep the weights on the instance after the first read
#  file-cache-enable-parallel-downloads parallel ranged reads fill the file cache several times faster
#  file-cache-cache-file-for-range-read safetensors are read with ranges (mmap); cache them anyway
MOUNT_OPTIONS="implicit-dirs;metadata-cache-ttl-secs=60;metadata-cache-negative-ttl-secs=0;file-cache-max-size-mb=-1;file-cache-enable-parallel-downloads=true;file-cache-cache-file-for-range-read=true"
VOLUME="name=models,type=cloud-storage,bucket=$BUCKET,mount-options=$MOUNT_OPTIONS"
# Documents wait in the bucket (GNOSIS_INPUT_STORE), not in Redis: Redis holds records, results and the queue.
COMMON_ENV="REDIS_URL=$REDIS_URL,MODEL_CACHE_PATH=/cache/huggingface,OCR_MODEL_ID=$OCR_MODEL_ID,OCR_MODEL_REVISION=$OCR_MODEL_REVISION,GNOSIS_INPUT_STORE=/cache/inputs"

echo "== build and push images ($TAG)"
# cloudbuild.yaml: `--tag` alone builds only a file named Dockerfile, and the worker's gpu target.
gcloud builds submit --project "$PROJECT" --config cloudbuild.yaml \
  --substitutions "_REPO=$REPO,_TAG=$TAG,_WORKER_TARGET=gpu" .

echo "== warm the model cache in the bucket (one download; exits 0 when the cache is ready)"
gcloud run jobs deploy gnosis-ocr-cache-warm --project "$PROJECT" --region "$REGION" \
  --image "$REPO/worker:$TAG" --command gnosis-ocr --args cache,warm \
  --set-env-vars "$COMMON_ENV,GNOSIS_LEASE_TTL=30" --set-secrets "HF_TOKEN=hf-token:latest" \
  --cpu 4 --memory 16Gi --task-timeout 3600 --max-retries 1 \
  --network "$NETWORK" --subnet "$SUBNET" --vpc-egress private-ranges-only \
  --add-volume "$VOLUME" --add-volume-mount volume=models,mount-path=/cache
gcloud run jobs execute gnosis-ocr-cache-warm --project "$PROJECT" --region "$REGION" --wait
# Re-hash what was written before any worker loads it.
gcloud run jobs deploy gnosis-ocr-cache-verify --project "$PROJECT" --region "$REGION" \
  --image "$REPO/worker:$TAG" --command gnosis-ocr --args cache,verify --set-env-vars "$COMMON_ENV" \
  --cpu 4 --memory 8Gi --task-timeout 1800 --max-retries 0 \
  --network "$NETWORK" --subnet "$SUBNET" --vpc-egress private-ranges-only \
  --add-volume "$VOLUME" --add-volume-mount volume=models,mount-path=/cache
gcloud run jobs execute gnosis-ocr-cache-verify --project "$PROJECT" --region "$REGION" --wait

echo "== API service (no GPU; the bucket is mounted for the documents it accepts)"
# Its /metrics are the whole fleet's (every worker records into Redis), scraped by Managed Service for
# Prometheus's collector beside it: the sidecar's default scrapes :8080/metrics every 30 s. CPU stays
# allocated between requests, or a scrape on an idle instance can fail.
gcloud run deploy gnosis-ocr-api --project "$PROJECT" --region "$REGION" \
  --concurrency 500 --timeout 120 --no-cpu-throttling \
  --network "$NETWORK" --subnet "$SUBNET" --vpc-egress private-ranges-only --add-volume "$VOLUME" \
  --container api --image "$REPO/api:$TAG" --port 8080 \
  --set-env-vars "$COMMON_ENV,OCR_ENGINE=nanonets,GNOSIS_API_WORKERS=2,GNOSIS_MAX_UPLOAD_BYTES=32000000,GNOSIS_ACCEPT_REPLICAS=$ACCEPT_REPLICAS" \
  --set-secrets "GNOSIS_API_KEYS=gnosis-api-keys:latest" --cpu 2 --memory 1Gi \
  --add-volume-mount volume=models,mount-path=/cache \
  --startup-probe httpGet.path=/healthz --liveness-probe httpGet.path=/healthz \
  --container collector --image "$GMP_SIDECAR" --cpu 1 --memory 512Mi --depends-on api

if [ "$ALERTS" = 1 ]; then
  echo "== alert policies (Cloud Monitoring, from deploy/prometheus/alerts.yml), unless made already"
  # `migrate` creates new policies each time it runs: a second deploy would page twice.
  made=$(gcloud alpha monitoring policies list --project "$PROJECT" --format 'value(name)' \
    --filter 'displayName:"gnosis_ocr/"')
  if [ -z "$made" ]; then
    gcloud alpha monitoring policies migrate --project "$PROJECT" \
      --policies-from-prometheus-alert-rules-yaml deploy/prometheus/alerts.yml
  else
    echo "alert policies gnosis_ocr/* exist already; delete them to make them anew from alerts.yml"
  fi
fi

echo "== GPU workers (worker pool; one Celery process per GPU)"
# Cloud Run sends SIGTERM and kills 10 s later: a page that cannot finish by then is handed back and run
# again elsewhere (its attempt counted), so scale-in costs time, never a page.
pool=(--gpu-type "$GPU_TYPE" --no-gpu-zonal-redundancy --instances "$WORKERS"
  --network "$NETWORK" --subnet "$SUBNET" --vpc-egress private-ranges-only --add-volume "$VOLUME")
cpu=8 memory=32Gi collector=()
if [ "$WORKER_METRICS" = 1 ]; then
  echo "== the workers' own metrics: a collector beside each, scraping GNOSIS_WORKER_PORT (deploy/rungmp-worker.yaml)"
  gcloud secrets describe gnosis-ocr-rungmp --project "$PROJECT" >/dev/null 2>&1 ||
    gcloud secrets create gnosis-ocr-rungmp --project "$PROJECT" --replication-policy automatic
  gcloud secrets versions add gnosis-ocr-rungmp --project "$PROJECT" --data-file deploy/rungmp-worker.yaml
  # Both containers share the instance's 8 CPUs and 32 GiB (over 24 GiB wants all 8), so the worker gives
  # up two CPUs and 9 GiB. As for services, the GPU's type is the pool's and its count the worker's.
  cpu=6 memory=23Gi
  collector=(--container collector --image "$GMP_SIDECAR" --cpu 1 --memory 512Mi --depends-on worker
    --set-secrets /etc/rungmp/config.yaml=gnosis-ocr-rungmp:latest)
fi
gcloud beta run worker-pools deploy gnosis-ocr-worker --project "$PROJECT" --region "$REGION" "${pool[@]}" \
  ${collector[0]:+--container worker} \
  --image "$REPO/worker:$TAG" --command gnosis-ocr --args worker,--concurrency,1 \
  --set-env-vars "$COMMON_ENV,OCR_ENGINE=nanonets,GNOSIS_WORKER_PORT=9808,GNOSIS_PAGE_SOFT_TIMEOUT=600" \
  --gpu 1 --cpu "$cpu" --memory "$memory" --add-volume-mount volume=models,mount-path=/cache "${collector[@]}"

if [ "$AUTOSCALE" = 1 ]; then
  echo "== autoscaler: CREMA scales the worker pool on the pages waiting in Redis (deploy/crema.yaml)"
  address=${REDIS_URL#*://}; address=${address#*@}; address=${address%%/*}
  config=$(mktemp)
  sed -e "s|PROJECT|$PROJECT|g; s|REGION|$REGION|g; s|REDIS_ADDRESS|$address|g" deploy/crema.yaml >"$config"
  gcloud parametermanager parameters describe gnosis-ocr-crema --project "$PROJECT" --location global >/dev/null 2>&1 ||
    gcloud parametermanager parameters create gnosis-ocr-crema --project "$PROJECT" --location global --parameter-format YAML
  gcloud parametermanager parameters versions create "$TAG" --project "$PROJECT" --location global \
    --parameter gnosis-ocr-crema --payload-data-from-file "$config"
  gcloud run deploy gnosis-ocr-autoscaler --project "$PROJECT" --region "$REGION" \
    --image us-central1-docker.pkg.dev/cloud-run-oss-images/crema-v1/autoscaler:1.0 \
    --service-account "${CREMA_SERVICE_ACCOUNT:-crema@$PROJECT.iam.gserviceaccount.com}" \
    --set-env-vars "CREMA_CONFIG=projects/$PROJECT/locations/global/parameters/gnosis-ocr-crema/versions/$TAG" \
    --no-allow-unauthenticated --no-cpu-throttling --min-instances 1 --max-instances 1 \
    --network "$NETWORK" --subnet "$SUBNET" --vpc-egress private-ranges-only
  rm -f "$config"
fi

echo "== done: API at $(gcloud run services describe gnosis-ocr-api --project "$PROJECT" --region "$REGION" --format 'value(status.url)')"
