"""`gnosis-ocr dev`: the whole stack on one machine (Redis if needed, a worker, the API)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

import redis

from .processes import die_with_parent
from .redisconn import connect, redact
from .settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(sub) -> None:
    p = sub.add_parser("dev", help="run API + worker (+ Redis if none answers) on this machine")
    p.add_argument("--port", type=int, default=8080, help="the API's port (default 8080)")
    p.add_argument("--concurrency", type=int, default=1, help="the worker's pool processes (default 1)")
    p.add_argument("--submit", metavar="FILE", nargs="+",
                   help="submit these documents, print their results, then stop the stack")
    p.set_defaults(func=run)


def _cpu_engine() -> str:
    """Tesseract when its English model is installed; otherwise RapidOCR, whose model is in its wheel."""
    from .errors import GnosisError
    from .worker.engines.tesseract import tessdata_dir

    try:
        tessdata_dir()
        return "tesseract"
    except GnosisError as exc:
        print(f"gnosis-ocr dev: {exc.message} Using rapidocr, which runs words together.", file=sys.stderr)
        return "rapidocr"


def _redis_answers(url: str) -> bool:
    try:
        return bool(connect(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _start_redis(url: str) -> subprocess.Popen | None:
    parsed = urlparse(url)
    binary = shutil.which("redis-server")
    if binary is None or parsed.hostname not in ("localhost", "127.0.0.1", "::1"):
        return None
    workdir = tempfile.mkdtemp(prefix="gnosis-redis-")
    proc = _spawn([binary, "--port", str(parsed.port or 6379), "--bind", "127.0.0.1",
                   "--dir", workdir, "--appendonly", "yes", "--maxmemory-policy", "noeviction",
                   "--save", ""], subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _redis_answers(url):
        time.sleep(0.05)
    return proc


def _spawn(args: list[str], log, **kwargs) -> subprocess.Popen:
    """A child in its own process group, so stopping it stops everything it started (pool processes,
    gunicorn workers, the light worker), and told to stop if this process dies without cleaning up.
    Its output goes to `log` (stderr, or a file with --submit): never to stdout, which carries only
    the results, so `dev --submit f > f.md` is clean and no access-log line lands in a page."""
    return subprocess.Popen(args, start_new_session=True, preexec_fn=die_with_parent(), stdout=log,
                            stderr=subprocess.STDOUT, **kwargs)


def _log_file():
    """Where a --submit run's stack logs go: a fresh file, named on the first line, kept afterwards."""
    fd, path = tempfile.mkstemp(prefix="gnosis-ocr-dev-", suffix=".log")
    return os.fdopen(fd, "w"), path


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _stop(procs: list[subprocess.Popen], *, grace: float = 15) -> None:
    for p in reversed(procs):
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in reversed(procs):
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:  # stragglers: a page that would not stop, a pool process that outlived its parent
        _signal_group(p, signal.SIGKILL)
        if p.poll() is None:
            p.wait(timeout=10)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _on_sigterm(signum, frame) -> None:
    # A supervisor's stop: unwind through run()'s finally, which stops the whole stack.
    raise SystemExit(128 + signum)


def _wait_http(url: str, timeout: float) -> bool:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return False


def _submit(argv: list[str]) -> int:
    """`gnosis-ocr submit ARGV`, parsed by the submit command's own parser (not through cli.py,
    which imports this module)."""
    from . import submit

    parser = argparse.ArgumentParser(prog="gnosis-ocr")
    submit.add_parser(parser.add_subparsers())
    args = parser.parse_args(["submit", *argv])
    return args.func(args)


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    # On a laptop or CI without a GPU the CPU engine is the sensible default.
    env.setdefault("OCR_ENGINE", _cpu_engine())
    if env["OCR_ENGINE"] == "nanonets":
        env.setdefault("MODEL_CACHE_PATH", os.path.expanduser("~/.cache/gnosis-ocr/huggingface"))
    settings = Settings.from_env(env)
    procs: list[subprocess.Popen] = []
    # With --submit a newcomer wants the text, not 300 lines of banners and access logs: those go to
    # a file. Without it, `dev` is the stack itself and its logs stay on screen.
    log, log_path = _log_file() if args.submit else (sys.stderr, None)
    if log_path:
        print(f"gnosis-ocr dev: the stack's logs go to {log_path}", file=sys.stderr)
    if not _redis_answers(settings.redis_url):
        started = _start_redis(settings.redis_url)
        if started is None or not _redis_answers(settings.redis_url):
            print(f"gnosis-ocr: nothing answers at {redact(settings.redis_url)} and no local redis-server "
                  "could be started",
                  file=sys.stderr)
            if log_path:  # nothing was started, so nothing was logged: no empty file is left behind
                log.close()
                os.unlink(log_path)
            return EXIT_USAGE
        procs.append(started)
        print(f"started redis-server for {redact(settings.redis_url)}", file=sys.stderr)
    cli = [sys.executable, "-m", "gnosis_ocr.cli"]
    signal.signal(signal.SIGTERM, _on_sigterm)
    base = f"http://127.0.0.1:{args.port}"
    try:
        if log_path:
            processes = f"{args.concurrency} process{'es' if args.concurrency != 1 else ''}"
            print(f"gnosis-ocr dev: starting a worker ({env['OCR_ENGINE']}, {processes}) and the API", file=sys.stderr)
        procs.append(_spawn([*cli, "worker", f"--concurrency={args.concurrency}"], log, env=env))
        procs.append(_spawn([*cli, "api", "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"],
                            log, env=env))
        if not _wait_http(base + "/readyz", 60):
            print("gnosis-ocr: the API did not become ready", file=sys.stderr)
            if log_path:
                print(f"the last lines of {log_path}:\n{_tail(log_path)}", file=sys.stderr)
            return EXIT_FAILED
        print(f"gnosis-ocr dev: API at {base} (engine {env['OCR_ENGINE']}); Ctrl-C stops", file=sys.stderr)
        if args.submit:
            code = _submit(["--wait", "--url", base, "--timeout", "300", *args.submit])
            if code != 0 and log_path:
                print(f"gnosis-ocr dev: the stack's logs are in {log_path}", file=sys.stderr)
            return code
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return EXIT_FAILED
    finally:
        _stop(procs)
        if log_path:
            log.close()
