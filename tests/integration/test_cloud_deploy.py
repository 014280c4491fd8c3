"""The cloud deploys, checked by the real tools that run here without a cloud: every gcloud call in
deploy/cloudrun.sh through the real gcloud's argument parser (with an empty configuration it parses
a command, then stops at "no active account"), cloudbuild.yaml through `gcloud builds submit`'s own
schema check, and the GKE overlays through `kubectl kustomize` and `kubernetes-validate --strict`."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import yaml

from gnosis_ocr import broker, defaults
from harness.stack import ROOT

GCLOUD = shutil.which("gcloud")
NEWER_FLAGS = {"--gpu": True, "--gpu-type": True, "--instances": True, "--no-gpu-zonal-redundancy": False}
"""Worker-pool flags the script needs that older gcloud releases lack, and whether each takes a value."""

# A gcloud on PATH that hands each call to the real one and records whether it parsed. Help and version
# pass through; with SHIM_NEWER=1 it stands in for a newer gcloud: it claims the worker-pool GPU flags,
# and checks a call using them with those flags taken out (reporting them as not checked).
SHIM = textwrap.dedent("""\
    #!{python}
    import hashlib, json, os, subprocess, sys
    REAL, NEWER = {real!r}, {newer!r}
    args = sys.argv[1:]
    def log(**entry):
        with open(os.environ["SHIM_LOG"], "a") as f:
            f.write(json.dumps(dict(args=args, **entry)) + "\\n")
    def answer(argv, key):
        # The same gcloud answers the same question the same way: asked once for the module's runs (each
        # answer starts gcloud afresh, seconds of CPU). (exit code, stdout, stderr)
        path = os.path.join(os.environ["SHIM_CACHE"], key.hexdigest())
        if not os.path.exists(path):
            r = subprocess.run([REAL] + argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            with open(path + ".tmp", "w") as f:
                json.dump([r.returncode, r.stdout, r.stderr], f)
            os.replace(path + ".tmp", path)
        return json.load(open(path))
    pool = args[:4] == ["beta", "run", "worker-pools", "deploy"]
    if os.environ.get("SHIM_NEWER") == "1" and pool and "--help" in args:
        print("--gpu=GPU --gpu-type=GPU_TYPE --instances=INSTANCES --[no-]gpu-zonal-redundancy")
        sys.exit(0)
    if args[:1] == ["version"] or "--help" in args:
        log(passthrough=True)
        code, out, err = answer(args, hashlib.sha256(json.dumps(args).encode()))
        sys.stdout.write(out)
        sys.stderr.write(err)
        sys.exit(code)
    checked, unchecked, skip = [], [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if os.environ.get("SHIM_NEWER") == "1" and name in NEWER:
            unchecked.append(name)
            skip = NEWER[name] and "=" not in arg
            continue
        checked.append(arg)
    key = hashlib.sha256(json.dumps(checked).encode())  # and the files it names: their content is parsed too
    for arg in checked:
        for part in arg.split("=", 1)[-1].split(","):
            if os.path.isfile(part):
                key.update(open(part, "rb").read())
    stderr = answer(checked, key)[2]
    parsed = "do not currently have an active account" in stderr
    log(parsed=parsed, unchecked=unchecked, stderr=stderr[-600:])
    if not parsed:
        sys.stderr.write(stderr)
        sys.exit(2)
    sys.exit(1 if "describe" in args else 0)  # a fresh project: nothing to describe yet
""")


def run_script(tmp_path, *, newer: bool, parses: str, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "gcloud"
    shim.write_text(SHIM.format(python=sys.executable, real=GCLOUD, newer=NEWER_FLAGS))
    shim.chmod(0o755)
    config = tmp_path / "gcloud-config"  # empty: no account, no project, no network call made
    config.mkdir(exist_ok=True)
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    full_env = {
        **os.environ,
        "PATH": f"{shim_dir}:{os.environ['PATH']}",
        "CLOUDSDK_CONFIG": str(config),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "SHIM_LOG": str(log),
        "SHIM_NEWER": "1" if newer else "0",
        "SHIM_CACHE": parses,
        "PROJECT": "my-proj",
        "REGION": "europe-west4",
        "BUCKET": "my-models",
        "TAG": "abc1234",
        "REDIS_URL": "redis://10.0.0.3:6379/0",
        **env,
    }
    r = subprocess.run(
        ["bash", str(ROOT / "deploy/cloudrun.sh")],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return r, [json.loads(line) for line in log.read_text().splitlines()]


@functools.lru_cache(maxsize=None)
def gcloud_has_gpu_worker_pools() -> bool:
    env = {**os.environ, "CLOUDSDK_CONFIG": os.environ.get("CLOUDSDK_CONFIG", "/tmp/gnosis-gcloud-empty")}
    out = subprocess.run(
        [GCLOUD, "beta", "run", "worker-pools", "deploy", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    ).stdout
    return all(f"{flag}=" in out for flag in ("--gpu", "--gpu-type", "--instances"))


needs_gcloud = pytest.mark.skipif(GCLOUD is None, reason="the Google Cloud CLI is not installed")


@pytest.fixture(scope="module")
def parses(tmp_path_factory) -> str:
    """Where the shim keeps what gcloud made of each call, for this module's runs of the script."""
    return str(tmp_path_factory.mktemp("gcloud-parses"))


@needs_gcloud
@pytest.mark.parametrize("worker_metrics", ["0", "1"], ids=["one-container-workers", "workers-with-collector"])
def test_every_gcloud_call_of_the_cloudrun_script_parses(tmp_path, parses, worker_metrics):
    newer = not gcloud_has_gpu_worker_pools()
    r, calls = run_script(tmp_path, newer=newer, parses=parses, AUTOSCALE="1", WORKER_METRICS=worker_metrics)
    assert r.returncode == 0, r.stderr[-3000:]
    made = [c for c in calls if not c.get("passthrough")]
    refused = [(c["args"][:3], c["stderr"]) for c in made if not c["parsed"]]
    assert not refused, refused
    commands = [" ".join(a for a in c["args"] if not a.startswith("-"))[:60] for c in made]
    for expected in (
        "builds submit",
        "run jobs deploy gnosis-ocr-cache-warm",
        "run jobs execute gnosis-ocr-cache-warm",
        "run jobs deploy gnosis-ocr-cache-verify",
        "run deploy gnosis-ocr-api",
        "beta run worker-pools deploy gnosis-ocr-worker",
        "parametermanager parameters create",
        "parametermanager parameters versions create",
        "run deploy gnosis-ocr-autoscaler",
        "alpha monitoring policies list",
        "alpha monitoring policies migrate",
    ):
        assert any(c.startswith(expected) for c in commands), (expected, commands)
    # The API's fleet-wide /metrics are scraped by Managed Prometheus's collector, a container beside it.
    api = next(c["args"] for c in made if c["args"][:3] == ["run", "deploy", "gnosis-ocr-api"])
    containers = [api[i + 1] for i, a in enumerate(api) if a == "--container"]
    assert containers == ["api", "collector"] and "--no-cpu-throttling" in api, api
    collector = api[api.index("collector"):]
    assert "cloud-run-gmp-sidecar" in collector[collector.index("--image") + 1], collector
    migrate = next(c["args"] for c in made if c["args"][:4] == ["alpha", "monitoring", "policies", "migrate"])
    assert "deploy/prometheus/alerts.yml" in migrate, migrate
    pool = next(c["args"] for c in made if c["args"][:4] == ["beta", "run", "worker-pools", "deploy"])
    if worker_metrics == "1":  # its own collector, configured from the RunMonitoring in Secret Manager
        assert [pool[i + 1] for i, a in enumerate(pool) if a == "--container"] == ["worker", "collector"], pool
        assert "/etc/rungmp/config.yaml=gnosis-ocr-rungmp:latest" in pool, pool
        stored = next(c["args"] for c in made if c["args"][:3] == ["secrets", "versions", "add"])
        assert "deploy/rungmp-worker.yaml" in stored, stored
        scrape = yaml.safe_load((ROOT / "deploy" / "rungmp-worker.yaml").read_text())["spec"]["endpoints"]
        port = re.search(r"GNOSIS_WORKER_PORT=(\d+)", pool[pool.index("--set-env-vars") + 1]).group(1)
        assert scrape == [{"port": int(port), "path": "/metrics", "interval": "30s"}], scrape
    else:
        assert "--container" not in pool, pool
    # The model is in the bucket, and checked, before any worker is rolled out to load it.
    assert commands.index(
        next(c for c in commands if c.startswith("run jobs execute gnosis-ocr-cache-verify"))
    ) < commands.index(next(c for c in commands if c.startswith("beta run worker-pools deploy")))
    build = next(c["args"] for c in made if c["args"][:2] == ["builds", "submit"])
    assert "--config" in build and "cloudbuild.yaml" in build  # its schema was checked by that call
    unchecked = sorted({flag for c in made for flag in c["unchecked"]})
    if unchecked:  # said in the run's summary, not silently skipped
        warnings.warn(
            f"this gcloud lacks {', '.join(unchecked)}: the worker-pool call was checked without them", stacklevel=1
        )


@needs_gcloud
def test_the_alert_rules_become_cloud_monitoring_policies_with_their_queries_and_documentation():
    # The conversion `gcloud alpha monitoring policies migrate` makes before it calls the API, run here
    # with gcloud's own code and Python (it needs no account): what Cloud Run's alerting will hold.
    sdk = os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(GCLOUD)), ".."))
    python = next((p for p in (os.path.join(sdk, "platform/bundledpythonunix/bin/python3"),) if os.path.exists(p)),
                  shutil.which("python3"))
    script = textwrap.dedent("""\
        import json, sys
        from apitools.base.py import encoding
        from googlecloudsdk.api_lib.util import apis
        from googlecloudsdk.command_lib.monitoring import util
        messages = apis.GetMessagesModule("monitoring", "v3")
        policies = util.PrometheusMessageFromString(open(sys.argv[1]).read(), messages, None)
        print(json.dumps([json.loads(encoding.MessageToJson(p)) for p in policies]))
    """)
    rules_file = ROOT / "deploy" / "prometheus" / "alerts.yml"
    done = subprocess.run([python, "-c", script, str(rules_file)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{sdk}/lib:{sdk}/lib/third_party"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    policies = {p["displayName"]: p for p in json.loads(done.stdout)}
    rules = yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]
    assert sorted(policies) == sorted(f"gnosis_ocr/{rule['alert']}" for rule in rules)
    for rule in rules:
        policy = policies[f"gnosis_ocr/{rule['alert']}"]
        condition = policy["conditions"][0]["conditionPrometheusQueryLanguage"]
        assert condition["query"] == rule["expr"] and condition["labels"] == rule["labels"], policy
        assert condition.get("duration") == (f"{int(rule['for'][:-1]) * 60}s" if "for" in rule else None), policy
        # What the on-call reads in the notification: the rule's description (Cloud Monitoring drops `summary`).
        assert policy["documentation"]["content"] == rule["annotations"]["description"], policy


@needs_gcloud
def test_the_cloudrun_script_stops_before_deploying_with_a_gcloud_too_old_for_gpu_worker_pools(tmp_path, parses):
    if gcloud_has_gpu_worker_pools():
        pytest.skip("this gcloud has GPU worker pools: nothing to refuse")
    r, calls = run_script(tmp_path, newer=False, parses=parses)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot deploy GPU worker pools" in lines[0] and "--gpu-type" in lines[0], r.stderr
    assert all(c.get("passthrough") for c in calls), calls  # nothing but version and help was asked


def test_the_cloudrun_script_says_which_settings_it_needs(tmp_path):
    r = subprocess.run(
        ["bash", str(ROOT / "deploy/cloudrun.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("PROJECT", "REGION", "BUCKET", "REDIS_URL")},
        timeout=30,
        check=False,
    )
    assert r.returncode != 0 and "PROJECT" in r.stderr


KUBECTL = shutil.which("kubectl")
VALIDATE = shutil.which("kubernetes-validate") or (
    shutil.which("kubernetes-validate", path=os.path.dirname(sys.executable))
)


def render(overlay: str) -> tuple[str, list[dict]]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "deploy/gke/overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out, [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.skipif(KUBECTL is None or VALIDATE is None, reason="kubectl or kubernetes-validate is not installed")
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_gke_overlays_render_and_pass_strict_schema_validation(overlay):
    text, docs = render(overlay)
    r = subprocess.run(
        [VALIDATE, "--strict", "-"], input=text, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # Only KEDA's and Managed Prometheus's custom resources have no schema here; they are checked by hand below.
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("WARN")]
    assert {re.search(r"kind (\w+)", w).group(1) for w in warnings} == {"ScaledObject", "PodMonitoring", "Rules"}, \
        warnings

    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert {"Deployment", "Service", "Job", "ServiceAccount", "EndpointSlice", "ScaledObject"} <= {k for k, _ in by}
    assert not any(d["metadata"].get("annotations", {}).get("config.kubernetes.io/local-config") for d in docs)
    worker = by[("Deployment", "gnosis-ocr-worker")]["spec"]["template"]
    api = by[("Deployment", "gnosis-ocr-api")]["spec"]["template"]
    warm = by[("Job", "gnosis-ocr-cache-warm")]["spec"]["template"]
    for pod in (worker, api, warm):  # the bucket through the Cloud Storage FUSE CSI driver, everywhere
        assert pod["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
        bucket = next(v for v in pod["spec"]["volumes"] if v["name"] == "bucket")["csi"]
        assert (
            bucket["driver"] == "gcsfuse.csi.storage.gke.io"
            and bucket["volumeAttributes"]["bucketName"] == "my-gnosis-models"
        )
        assert "metadata-cache:negative-ttl-secs:0" in bucket["volumeAttributes"]["mountOptions"]
        assert pod["spec"]["serviceAccountName"] == "gnosis-ocr"
    options = next(v for v in worker["spec"]["volumes"] if v["name"] == "bucket")["csi"]["volumeAttributes"][
        "mountOptions"
    ]
    for option in ("file-cache:max-size-mb:-1", "file-cache:enable-parallel-downloads:true", "implicit-dirs"):
        assert option in options
    assert by[("ServiceAccount", "gnosis-ocr")]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    assert by[("EndpointSlice", "redis")]["endpoints"][0]["addresses"] == ["10.0.0.3"]

    probes = worker["spec"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probe"}
    assert probes["ports"] == [{"name": "probe", "containerPort": 9808}]
    api_c = api["spec"]["containers"][0]
    assert (api_c["livenessProbe"]["httpGet"]["path"], api_c["readinessProbe"]["httpGet"]["path"]) == (
        "/healthz",
        "/readyz",
    )
    # A worker scaled in gets long enough to finish a page it started.
    assert worker["spec"]["terminationGracePeriodSeconds"] >= (
        defaults.DEFAULT_PAGE_SOFT_TIMEOUT + defaults.PAGE_HARD_TIMEOUT_GRACE
    )
    limits = probes.get("resources", {}).get("limits", {})
    assert (limits.get("nvidia.com/gpu") == "1") == (overlay == "gpu")
    env = by[next(k for k in by if k[0] == "ConfigMap")]["data"]
    assert (
        env["OCR_ENGINE"] == {"cpu": "tesseract", "gpu": "nanonets"}[overlay]
        and env["REDIS_URL"] == "redis://redis:6379/0"
    )

    # The API's /metrics is scraped, and the alerts loaded are the ones promtool tests (tests/unit/test_alerts.py).
    scrape = by[("PodMonitoring", "gnosis-ocr-api")]["spec"]
    assert scrape["selector"]["matchLabels"].items() <= api["metadata"]["labels"].items()
    assert scrape["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert any(p["name"] == "http" for p in api["spec"]["containers"][0]["ports"])
    # And each worker's own port: its devices' batch and time (the dashboard's GPU row).
    scrape = by[("PodMonitoring", "gnosis-ocr-worker")]["spec"]
    assert scrape["selector"]["matchLabels"].items() <= worker["metadata"]["labels"].items()
    assert scrape["endpoints"] == [{"port": "probe", "path": "/metrics", "interval": "30s"}]
    assert by[("Rules", "gnosis-ocr")]["spec"]["groups"] == \
        yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]

    scaled = by[("ScaledObject", "gnosis-ocr-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "gnosis-ocr-worker"
    triggers = scaled["triggers"]
    # The lists KEDA reads are the page queue's: kombu's name for each priority step.
    assert [t["metadata"]["listName"] for t in triggers] == broker.queue_keys(defaults.DEFAULT_QUEUE)
    assert scaled["advanced"]["scalingModifiers"]["formula"] == " + ".join(t["name"] for t in triggers)


def test_the_cloud_run_autoscaler_reads_the_same_lists():
    config = yaml.safe_load((ROOT / "deploy/crema.yaml").read_text())
    triggers = config["spec"]["scaledObjects"][0]["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == broker.queue_keys(defaults.DEFAULT_QUEUE)
