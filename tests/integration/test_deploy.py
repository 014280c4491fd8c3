"""Deployment files, checked by what can run here (no Docker engine): they parse, and every command
and variable they use is one the code accepts."""

from __future__ import annotations

import re

import pytest
import yaml

from gnosis_ocr.cli import build_parser
from harness.stack import ROOT

CODE = "\n".join(p.read_text() for p in (ROOT / "gnosis_ocr").rglob("*.py"))
# Read by libraries, not by our code.
EXTERNAL_VARS = {"HF_TOKEN", "HF_HOME", "HF_ENDPOINT", "PATH", "VIRTUAL_ENV", "DEBIAN_FRONTEND", "PYTHONUNBUFFERED",
                 "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_command(name: str) -> list[str]:
    text = (ROOT / name).read_text()
    entry = eval(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # noqa: S307 - our own file
    cmd = eval(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # noqa: S307
    return entry + cmd


def test_compose_services_and_profiles():
    services = compose()["services"]
    assert {"redis", "api", "worker-gpu", "worker-cpu", "flower"} <= set(services)
    assert all("healthcheck" in s for s in services.values())
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd and "noeviction" in redis_cmd
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["OCR_ENGINE"] == "nanonets" and services["worker-cpu"]["environment"][
        "OCR_ENGINE"] == "tesseract"
    assert "model-cache:/cache" in gpu["volumes"]


@pytest.mark.parametrize("service", ["api", "worker-gpu", "worker-cpu"])
def test_compose_commands_are_real_cli_commands(service):
    build_parser().parse_args(compose()["services"][service]["command"])


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_image_entrypoints_are_the_tested_commands(name):
    argv = dockerfile_command(name)
    assert argv[0] == "gnosis-ocr"
    build_parser().parse_args(argv[1:])


def test_every_variable_the_deploy_files_set_is_read_by_the_code():
    used = set()
    for service in compose()["services"].values():
        env = service.get("environment") or {}
        used |= set(env)
    for name in ("Dockerfile.api", "Dockerfile.worker", "deploy/cloudrun.sh", *sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "deploy/gke").rglob("*.yaml"))):
        text = (ROOT / name).read_text()
        used |= set(re.findall(r"\b((?:GNOSIS|OCR|MODEL|REDIS|HF)_[A-Z_]+)=", text))
        used |= set(re.findall(r"name: ((?:GNOSIS|OCR|MODEL|REDIS|HF)_[A-Z_]+)\b", text))  # a manifest's env
    unknown = sorted(v for v in used if v not in EXTERNAL_VARS and f'"{v}"' not in CODE)
    assert not unknown, f"set by deploy files but read nowhere: {unknown}"


def test_api_image_has_no_torch_and_both_run_as_non_root():
    api = (ROOT / "Dockerfile.api").read_text()
    assert "torch" not in api.replace("no torch", "")
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        assert re.search(r"^USER (?!root)\S+", (ROOT / name).read_text(), re.M), name


def test_cloudrun_script_is_valid_bash_and_warms_the_cache_before_rollout():
    import subprocess

    script = ROOT / "deploy/cloudrun.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert text.index("--args cache,warm") < text.index("gcloud beta run worker-pools deploy gnosis-ocr-worker")
    for option in ("file-cache", "metadata-cache", "implicit-dirs"):
        assert option in text, option


def test_the_wheel_the_images_install_holds_every_package_and_the_web_page(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("gnosis_ocr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("gnosis_ocr/__init__.py", "gnosis_ocr/api/static/index.html", "gnosis_ocr/api/static/app.js",
                 "gnosis_ocr/cache/fetch.py", "gnosis_ocr/worker/engines/nanonets.py"):
        assert path in names, path
    assert not any(n.startswith(("tests/", "bench/", "harness/")) for n in names)


def test_worker_image_targets_cpu_without_torch_and_gpu_with_the_tested_pair():
    chunks = re.split(r"^FROM ", (ROOT / "Dockerfile.worker").read_text(), flags=re.M)
    stages = {chunk.split()[2]: chunk for chunk in chunks if " AS " in chunk.splitlines()[0]}
    assert "torch" not in stages["cpu"] and "cuda" not in stages["cpu"].lower()
    assert "tesseract-ocr-eng" in stages["cpu"]
    tested = re.search(r"torch==\S+ torchvision==\S+", (ROOT / ".ci/run").read_text()).group()
    assert tested in stages["gpu"]
    services = compose()["services"]
    assert services["worker-cpu"]["build"]["target"] == "cpu" and services["worker-gpu"]["build"]["target"] == "gpu"
