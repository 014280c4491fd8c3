"""The `gnosis-ocr` command. Exit codes: 0 success, 1 job or check failed, 2 usage or configuration error."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import ConfigError, GnosisError
from .settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings(*, cache: bool = False) -> Settings:
    settings = Settings.from_env()
    if cache:
        settings.check_cache_writable()
    return settings


def cmd_api(args: argparse.Namespace) -> int:
    from .api.server import ApiServer

    settings = _settings()

    ApiServer(settings, host=args.host, port=args.port, workers=args.workers, threads=args.threads).run()
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import plan

    settings = _settings()
    return plan.run(plan.make(settings, light=args.light, pool=args.pool, concurrency=args.concurrency,
                              loglevel=args.loglevel), settings)


def cmd_cache(args: argparse.Namespace) -> int:
    import json

    from .cache.state import CacheState
    from .cache.store import ModelCache
    from .redisconn import connect

    settings = _settings(cache=args.action != "status")
    client = connect(settings.redis_url, socket_connect_timeout=settings.redis_timeout)
    if args.action == "status":
        print(json.dumps(CacheState(client, settings).describe(), indent=2))
        return EXIT_OK
    cache = ModelCache(settings, client)
    if args.action == "verify":
        sha, bad = cache.verify()
        for name in bad:
            print(f"corrupt: {name}", file=sys.stderr)
        print(f"{settings.model_id}@{sha}: {'FAILED, ' + str(len(bad)) + ' bad file(s)' if bad else 'ok'}")
        return EXIT_FAILED if bad else EXIT_OK

    def progress(event: dict) -> None:
        kind = event["event"]
        if kind == "resolved":
            print(f"resolved {settings.model_id}@{settings.model_revision} -> {event['sha']} "
                  f"({event['files']} files, {event['bytes']} bytes)", flush=True)
        elif kind == "file":
            print(f"  {'fetched' if event['downloaded'] else 'kept   '} {event['name']} ({event['size']} bytes)",
                  flush=True)
        elif kind == "waiting":
            print(f"another worker is downloading ({event['holder']}); waiting", flush=True)
        elif kind == "ready":
            print(f"ready: {event['files']} files, {event['bytes']} bytes", flush=True)

    path = cache.ensure_ready(progress, refresh=args.refresh)
    print(f"cache ready at {path}")
    return EXIT_OK


def cmd_workers(args: argparse.Namespace) -> int:
    import json

    import redis

    from . import fleet
    from .redisconn import connect

    settings = _settings()
    try:
        rows = fleet.workers(connect(settings.redis_url, socket_connect_timeout=settings.redis_timeout))
    except redis.RedisError as exc:
        print(f"gnosis-ocr: cannot read the workers' records: Redis: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        fleet.print_table(rows)
    else:
        print("no live worker")
    return EXIT_OK if any(w["ready"] for w in rows) else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["api"] and os.environ.get("GNOSIS_API_WORKER_CLASS", "gevent") == "gevent":
        # The API's workers are gevent workers: patch before anything (the parser's modules included)
        # imports ssl, socket or threading.
        from gevent import monkey

        monkey.patch_all()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("GNOSIS_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"gnosis-ocr: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except GnosisError as exc:
        print(f"gnosis-ocr: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _positive(name: str, *, most: int | None = None):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, not {value!r}") from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, not {number}")
        if most is not None and number > most:
            raise argparse.ArgumentTypeError(f"{name} must be at most {most}, not {number}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    from . import batchcmd, devstack, submit

    parser = argparse.ArgumentParser(prog="gnosis-ocr", description="Asynchronous OCR service.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("api", help="run the HTTP API under gunicorn")
    p.add_argument("--host", default=os.environ.get("GNOSIS_HOST", "0.0.0.0"),
                   help="address to listen on (default $GNOSIS_HOST or 0.0.0.0)")
    # String defaults from the environment go through `type` too: a malformed one is a usage error (exit 2).
    p.add_argument("--port", type=_positive("PORT / --port", most=65535), default=os.environ.get("PORT", "8080"),
                   help="port to listen on (default $PORT or 8080)")
    p.add_argument("--workers", type=_positive("GNOSIS_API_WORKERS / --workers"),
                   default=os.environ.get("GNOSIS_API_WORKERS", "2"),
                   help="gunicorn worker processes (default $GNOSIS_API_WORKERS or 2)")
    p.add_argument("--threads", type=_positive("GNOSIS_API_THREADS / --threads"),
                   default=os.environ.get("GNOSIS_API_THREADS", "16"),
                   help="threads per process with GNOSIS_API_WORKER_CLASS=gthread (default $GNOSIS_API_THREADS or 16)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="run a Celery worker consuming OCR pages")
    p.add_argument("--concurrency", type=_positive("--concurrency"), default=1,
                   help="pool processes for CPU engines; a GPU engine runs one batch per GPU and sizes its own pool")
    p.add_argument("--pool", choices=["prefork", "solo", "threads"], default=None,
                   help="Celery's pool (default: prefork for CPU engines, threads for a GPU one); on threads a "
                        "CPU engine is shared by the threads and recognises one page at a time")
    p.add_argument("--loglevel", default="INFO", help="Celery's log level (default INFO)")
    p.add_argument("--light", action="store_true",
                   help="consume only cache warm-ups, webhooks and batch listings (every page worker starts one "
                        "beside itself)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("cache", help="model-cache operations")
    p.add_argument("action", choices=["warm", "verify", "status"],
                   help="warm: download the model into the shared cache unless it is complete there (the CI/CD "
                        "step); verify: re-hash every file against the manifest; status: what the cache holds")
    p.add_argument("--refresh", action="store_true", help="re-resolve a branch or tag to its current commit")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("workers", help="the live workers: host, engine, readiness, pages in flight, GPU devices "
                                       "(exit 1 when none is ready)")
    p.add_argument("--json", action="store_true", help="every worker's record as JSON")
    p.set_defaults(func=cmd_workers)

    submit.add_parser(sub)
    batchcmd.add_parser(sub)
    devstack.add_parser(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
