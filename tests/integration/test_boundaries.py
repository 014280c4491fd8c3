"""Process boundaries and start-up: the API stays light; bad configuration fails fast with one line."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from gnosis_ocr import errors
from gnosis_ocr.settings import Settings
from harness.stack import ROOT, TEST_REDIS_URL

API_IMPORT_CHECK = r"""
import io, sys
from gnosis_ocr.api import create_app
from harness.docs import text_image, pdf_of_pages
app = create_app()
c = app.test_client()
assert c.post("/v1/jobs", data={"file": (io.BytesIO(text_image(["x"])), "a.png")}).status_code == 202
assert c.post("/v1/jobs", data={"file": (io.BytesIO(pdf_of_pages([["y"]])), "a.pdf")}).status_code == 202
for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/cache"):
    assert c.get(path).status_code == 200, path
c.post("/v1/cache/warm")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in (
    "torch", "transformers", "rapidocr_onnxruntime", "onnxruntime", "huggingface_hub", "torchvision", "tesserocr"))
print("HEAVY", heavy)
sys.exit(1 if heavy else 0)
"""


def test_api_process_never_imports_torch_or_engines(redis_url, tmp_path):
    env = {"REDIS_URL": redis_url, "MODEL_CACHE_PATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", API_IMPORT_CHECK], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("env,fragment", [
    ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://:notaport"}, "REDIS_URL"),
    ({"OCR_ENGINE": "easyocr"}, "OCR_ENGINE 'easyocr' is unknown"),
    ({"GNOSIS_MAX_PAGES": "many"}, "GNOSIS_MAX_PAGES"),
    ({"GNOSIS_JOB_TTL": "0"}, "GNOSIS_JOB_TTL must be positive"),
    ({"OCR_BATCH_SIZE": "-1"}, "OCR_BATCH_SIZE must not be negative"),
    ({"OCR_MODEL_ID": "no-slash"}, "OCR_MODEL_ID"),
    ({"GNOSIS_PAGE_SOFT_TIMEOUT": "100", "GNOSIS_PAGE_HARD_TIMEOUT": "50"}, "HARD_TIMEOUT"),
    ({"GNOSIS_ACCEPT_REPLICAS": "-1"}, "GNOSIS_ACCEPT_REPLICAS '-1' is not a number of replicas"),
    ({"GNOSIS_ACCEPT_REPLICAS": "all"}, "or `connected`"),
    ({"GNOSIS_ACCEPT_REPLICAS": "1", "GNOSIS_ACCEPT_REPLICAS_WAIT": "5"}, "shorter than GNOSIS_REDIS_TIMEOUT"),
])
def test_invalid_configuration_rejected(env, fragment):
    with pytest.raises(errors.ConfigError, match=fragment):
        Settings.from_env(env)


@pytest.mark.parametrize("command", [["api"], ["worker"], ["cache", "status"]])
def test_processes_fail_fast_on_bad_config_with_exit_2(command):
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", *command], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={"REDIS_URL": "redis//broken", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "REDIS_URL" in lines[0], r.stderr


@pytest.mark.parametrize("url", ["redis://:hunter2-secret@db:notaport/0", "sentinel://:hunter2-secret@s1:x/m/0",
                                 "http://:hunter2-secret@db:6379"])
def test_a_configuration_error_never_prints_the_redis_password(url):
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "api"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={"REDIS_URL": url, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "REDIS_URL" in r.stderr
    assert "hunter2" not in r.stderr + r.stdout and ":***@" in r.stderr


@pytest.mark.parametrize("name,value", [("PORT", "80a"), ("PORT", "99999"), ("GNOSIS_API_WORKERS", "two"),
                                        ("GNOSIS_API_THREADS", "0")])
def test_a_malformed_api_number_is_one_line_and_exit_2(name, value):
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "api"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={name: value, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{name} / --" in r.stderr.splitlines()[-1] and value in r.stderr.splitlines()[-1]


def test_an_api_that_cannot_listen_says_why_in_one_line_and_exits_2():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for args, fragment in ([["--host", "127.0.0.1", "--port", str(port)], f"127.0.0.1:{port}: another process"],
                               [["--host", "no-such-host.invalid"], "'no-such-host.invalid' is not an address"]):
            r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "api", *args], cwd=ROOT, capture_output=True,
                               text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert r.returncode == 2 and len(lines) == 1 and fragment in lines[0], r.stderr


def test_a_worker_asked_for_no_processes_is_refused():
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "worker", "--concurrency=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "--concurrency must be at least 1" in r.stderr.splitlines()[-1], r.stderr


def test_worker_fails_fast_on_unwritable_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "worker"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={"REDIS_URL": TEST_REDIS_URL, "MODEL_CACHE_PATH": str(blocker / "cache"),
                                        "OCR_ENGINE": "nanonets", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "MODEL_CACHE_PATH" in r.stderr


def test_visibility_timeout_outlasts_the_hard_limit_everywhere():
    from gnosis_ocr.broker import celery_config

    settings = Settings.from_env({"GNOSIS_PAGE_SOFT_TIMEOUT": "900"})
    conf = celery_config(settings)
    assert conf["task_time_limit"] > conf["task_soft_time_limit"] == 900
    for key in ("broker_transport_options", "result_backend_transport_options"):
        assert conf[key]["visibility_timeout"] > conf["task_time_limit"]
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1


@pytest.mark.parametrize("exc", [
    errors.UnreadableDocument("bad page", code="encrypted_document"),
    errors.DownloadTimeout("slow"),
    errors.Unavailable("down", retry_after=7),
])
def test_errors_survive_pickling_and_match_builtins(exc):
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc)
    assert (clone.code, clone.message, clone.retry_after) == (exc.code, exc.message, exc.retry_after)
    assert isinstance(errors.DownloadTimeout("x"), TimeoutError)
    assert isinstance(errors.NotFound("x"), LookupError)
    assert isinstance(errors.ModelCacheError("x"), OSError)


def test_the_api_writes_nothing_to_its_home_directory(stack, tmp_path):
    # gunicorn 25.1+ would open a control socket under $HOME: an error line at every start on a
    # read-only root filesystem, and one socket path shared by every API on the host.
    home = tmp_path / "home"
    home.mkdir()
    stack.api(HOME=str(home))
    api = stack.procs[-1]
    api.stop()
    assert list(home.iterdir()) == [] and "Control server" not in api.log(), api.log()[-2000:]
