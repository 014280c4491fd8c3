"""The one typed settings object each process builds from its environment at start-up."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

from . import defaults
from .errors import ConfigError

_REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class Settings:
    redis_url: str = defaults.DEFAULT_REDIS_URL
    model_cache_path: str = defaults.DEFAULT_MODEL_CACHE_PATH
    model_id: str = defaults.DEFAULT_MODEL_ID
    model_revision: str = defaults.DEFAULT_MODEL_REVISION
    engine: str = defaults.DEFAULT_ENGINE
    devices: tuple[str, ...] = ("auto",)
    max_new_tokens: int = defaults.DEFAULT_MAX_NEW_TOKENS
    engine_threads: int = 0
    max_upload_bytes: int = defaults.DEFAULT_MAX_UPLOAD_BYTES
    max_pages: int = defaults.DEFAULT_MAX_PAGES
    max_pixels: int = defaults.DEFAULT_MAX_PIXELS
    page_max_side: int = defaults.DEFAULT_PAGE_MAX_SIDE
    job_ttl: int = defaults.DEFAULT_JOB_TTL
    job_max_age: int = defaults.DEFAULT_JOB_MAX_AGE
    max_queued_bytes: int = defaults.DEFAULT_MAX_QUEUED_BYTES
    redis_memory_limit: float = defaults.DEFAULT_REDIS_MEMORY_LIMIT
    reconcile_grace: float = defaults.DEFAULT_RECONCILE_GRACE
    input_cache_bytes: int = defaults.DEFAULT_INPUT_CACHE_BYTES
    input_cache_dir: str = ""
    redis_retry: float = defaults.DEFAULT_REDIS_RETRY
    api_connections: int = defaults.DEFAULT_API_CONNECTIONS
    header_timeout: int = defaults.DEFAULT_HEADER_TIMEOUT
    api_worker_class: str = "gevent"
    max_key_pages: int = defaults.DEFAULT_MAX_KEY_PAGES
    input_store: str = "redis"
    page_soft_time_limit: int = defaults.DEFAULT_PAGE_SOFT_TIME_LIMIT
    page_hard_time_limit: int = defaults.DEFAULT_PAGE_SOFT_TIME_LIMIT + defaults.DEFAULT_PAGE_HARD_TIME_LIMIT_GRACE
    page_max_attempts: int = defaults.DEFAULT_PAGE_MAX_ATTEMPTS
    batch_size: int = defaults.DEFAULT_BATCH_SIZE
    prefill_batch: int = defaults.DEFAULT_PREFILL_BATCH
    repetition_window: int = defaults.DEFAULT_REPETITION_WINDOW
    vision_attention: str = "batched"
    prefetch_pages: int = defaults.DEFAULT_PREFETCH_PAGES
    queue: str = defaults.DEFAULT_QUEUE
    redis_timeout: float = defaults.DEFAULT_REDIS_TIMEOUT
    retry_after: int = defaults.DEFAULT_RETRY_AFTER
    lease_ttl: int = defaults.DEFAULT_LEASE_TTL
    lease_wait: int = defaults.DEFAULT_LEASE_WAIT
    download_workers: int = defaults.DEFAULT_DOWNLOAD_WORKERS
    download_stall: float = defaults.DEFAULT_DOWNLOAD_STALL
    cache_verify: str = "quick"
    visibility_wait: float = defaults.DEFAULT_VISIBILITY_WAIT
    heartbeat_interval: float = defaults.DEFAULT_HEARTBEAT_INTERVAL
    max_queue_depth: int = defaults.DEFAULT_MAX_QUEUE_DEPTH
    worker_port: int = 0
    null_engine_delay: float = defaults.DEFAULT_NULL_ENGINE_DELAY
    webhook_secret: str = ""
    webhook_allow_private: bool = False
    webhook_max_attempts: int = defaults.DEFAULT_WEBHOOK_MAX_ATTEMPTS
    webhook_backoff: float = defaults.DEFAULT_WEBHOOK_BACKOFF
    webhook_timeout: float = defaults.DEFAULT_WEBHOOK_TIMEOUT
    batch_buckets: tuple[str, ...] = ()
    max_batch_documents: int = defaults.DEFAULT_MAX_BATCH_DOCUMENTS
    api_key_hashes: frozenset[str] = field(default_factory=frozenset)
    metrics_open: bool = True

    @property
    def hub_cache(self) -> str:
        return os.path.join(self.model_cache_path, "hub")

    @property
    def visibility_timeout(self) -> int:
        """Seconds before the broker redelivers an unacknowledged task: always past its hard limit."""
        return self.page_hard_time_limit * 2 + 60

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        soft = _int(env, "GNOSIS_PAGE_SOFT_TIMEOUT", defaults.DEFAULT_PAGE_SOFT_TIME_LIMIT)
        keys = [k.strip() for k in env.get("GNOSIS_API_KEYS", "").split(",") if k.strip()]
        settings = cls(
            redis_url=env.get("REDIS_URL", defaults.DEFAULT_REDIS_URL),
            model_cache_path=env.get("MODEL_CACHE_PATH", defaults.DEFAULT_MODEL_CACHE_PATH),
            model_id=env.get("OCR_MODEL_ID", defaults.DEFAULT_MODEL_ID),
            model_revision=env.get("OCR_MODEL_REVISION", defaults.DEFAULT_MODEL_REVISION),
            engine=env.get("OCR_ENGINE", defaults.DEFAULT_ENGINE),
            devices=tuple(d.strip() for d in env.get("OCR_DEVICE", "auto").split(",") if d.strip()) or ("auto",),
            max_new_tokens=_int(env, "OCR_MAX_NEW_TOKENS", defaults.DEFAULT_MAX_NEW_TOKENS),
            engine_threads=_int(env, "OCR_THREADS", 0),
            max_upload_bytes=_int(env, "GNOSIS_MAX_UPLOAD_BYTES", defaults.DEFAULT_MAX_UPLOAD_BYTES),
            max_pages=_int(env, "GNOSIS_MAX_PAGES", defaults.DEFAULT_MAX_PAGES),
            max_pixels=_int(env, "GNOSIS_MAX_PIXELS", defaults.DEFAULT_MAX_PIXELS),
            page_max_side=_int(env, "GNOSIS_PAGE_MAX_SIDE", defaults.DEFAULT_PAGE_MAX_SIDE),
            job_ttl=_int(env, "GNOSIS_JOB_TTL", defaults.DEFAULT_JOB_TTL),
            job_max_age=_int(env, "GNOSIS_JOB_MAX_AGE", defaults.DEFAULT_JOB_MAX_AGE),
            max_queued_bytes=_int(env, "GNOSIS_MAX_QUEUED_BYTES", defaults.DEFAULT_MAX_QUEUED_BYTES),
            redis_memory_limit=_float(env, "GNOSIS_REDIS_MEMORY_LIMIT", defaults.DEFAULT_REDIS_MEMORY_LIMIT),
            reconcile_grace=_float(env, "GNOSIS_RECONCILE_GRACE", defaults.DEFAULT_RECONCILE_GRACE),
            input_cache_bytes=_int(env, "GNOSIS_INPUT_CACHE_BYTES", defaults.DEFAULT_INPUT_CACHE_BYTES),
            input_cache_dir=env.get("GNOSIS_INPUT_CACHE_DIR", ""),
            redis_retry=_float(env, "GNOSIS_REDIS_RETRY", defaults.DEFAULT_REDIS_RETRY),
            api_connections=_int(env, "GNOSIS_API_CONNECTIONS", defaults.DEFAULT_API_CONNECTIONS),
            header_timeout=_int(env, "GNOSIS_HEADER_TIMEOUT", defaults.DEFAULT_HEADER_TIMEOUT),
            api_worker_class=env.get("GNOSIS_API_WORKER_CLASS", "gevent"),
            max_key_pages=_int(env, "GNOSIS_MAX_KEY_PAGES", defaults.DEFAULT_MAX_KEY_PAGES),
            input_store=env.get("GNOSIS_INPUT_STORE", "redis"),
            page_soft_time_limit=soft,
            page_hard_time_limit=_int(
                env, "GNOSIS_PAGE_HARD_TIMEOUT", soft + defaults.DEFAULT_PAGE_HARD_TIME_LIMIT_GRACE
            ),
            page_max_attempts=_int(env, "GNOSIS_PAGE_MAX_ATTEMPTS", defaults.DEFAULT_PAGE_MAX_ATTEMPTS),
            batch_size=_int(env, "OCR_BATCH_SIZE", defaults.DEFAULT_BATCH_SIZE),
            prefill_batch=_int(env, "OCR_PREFILL_BATCH", defaults.DEFAULT_PREFILL_BATCH),
            repetition_window=_int(env, "OCR_REPETITION_WINDOW", defaults.DEFAULT_REPETITION_WINDOW),
            vision_attention=env.get("OCR_VISION_ATTENTION", "batched"),
            prefetch_pages=_int(env, "GNOSIS_PREFETCH_PAGES", defaults.DEFAULT_PREFETCH_PAGES),
            queue=env.get("GNOSIS_QUEUE", defaults.DEFAULT_QUEUE),
            redis_timeout=_float(env, "GNOSIS_REDIS_TIMEOUT", defaults.DEFAULT_REDIS_TIMEOUT),
            retry_after=_int(env, "GNOSIS_RETRY_AFTER", defaults.DEFAULT_RETRY_AFTER),
            lease_ttl=_int(env, "GNOSIS_LEASE_TTL", defaults.DEFAULT_LEASE_TTL),
            lease_wait=_int(env, "GNOSIS_LEASE_WAIT", defaults.DEFAULT_LEASE_WAIT),
            download_workers=_int(env, "GNOSIS_DOWNLOAD_WORKERS", defaults.DEFAULT_DOWNLOAD_WORKERS),
            download_stall=_float(env, "GNOSIS_DOWNLOAD_STALL_TIMEOUT", defaults.DEFAULT_DOWNLOAD_STALL),
            cache_verify=env.get("GNOSIS_CACHE_VERIFY", "quick"),
            visibility_wait=_float(env, "GNOSIS_CACHE_VISIBILITY_WAIT", defaults.DEFAULT_VISIBILITY_WAIT),
            heartbeat_interval=_float(env, "GNOSIS_HEARTBEAT_INTERVAL", defaults.DEFAULT_HEARTBEAT_INTERVAL),
            max_queue_depth=_int(env, "GNOSIS_MAX_QUEUE_DEPTH", defaults.DEFAULT_MAX_QUEUE_DEPTH),
            worker_port=_int(env, "GNOSIS_WORKER_PORT", 0),
            null_engine_delay=_float(env, "GNOSIS_NULL_ENGINE_DELAY", defaults.DEFAULT_NULL_ENGINE_DELAY),
            webhook_secret=env.get("GNOSIS_WEBHOOK_SECRET", ""),
            webhook_allow_private=_bool(env, "GNOSIS_WEBHOOK_ALLOW_PRIVATE", False),
            batch_buckets=tuple(p.strip() for p in env.get("GNOSIS_BATCH_BUCKETS", "").split(",") if p.strip()),
            max_batch_documents=_int(env, "GNOSIS_MAX_BATCH_DOCUMENTS", defaults.DEFAULT_MAX_BATCH_DOCUMENTS),
            webhook_max_attempts=_int(env, "GNOSIS_WEBHOOK_MAX_ATTEMPTS", defaults.DEFAULT_WEBHOOK_MAX_ATTEMPTS),
            webhook_backoff=_float(env, "GNOSIS_WEBHOOK_BACKOFF", defaults.DEFAULT_WEBHOOK_BACKOFF),
            webhook_timeout=_float(env, "GNOSIS_WEBHOOK_TIMEOUT", defaults.DEFAULT_WEBHOOK_TIMEOUT),
            api_key_hashes=frozenset(hash_key(k) for k in keys),
            metrics_open=_bool(env, "GNOSIS_METRICS_OPEN", True),
        )
        settings.validate()
        return settings

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        from .redisconn import redact

        url = urlparse(self.redis_url)
        if url.scheme == "sentinel":
            from .redisconn import parse_sentinel

            parse_sentinel(self.redis_url)
        elif url.scheme not in _REDIS_SCHEMES or (url.scheme != "unix" and not url.hostname):
            raise ConfigError(f"REDIS_URL {redact(self.redis_url)!r} is not a redis://, rediss://, unix:// or "
                              "sentinel:// URL")
        else:
            try:
                url.port  # noqa: B018 - raises on a malformed port
            except ValueError as exc:
                raise ConfigError(f"REDIS_URL {redact(self.redis_url)!r} has an invalid port") from exc
        if self.engine not in defaults.ENGINES:
            raise ConfigError(f"OCR_ENGINE {self.engine!r} is unknown; choose one of {', '.join(defaults.ENGINES)}")
        for device in self.devices:
            if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
                raise ConfigError(f"OCR_DEVICE {device!r} is not auto, cpu, cuda or cuda:N (or a comma-separated list)")
        for name in ("batch_size", "repetition_window", "prefetch_pages", "input_cache_bytes", "redis_retry"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.redis_memory_limit <= 1:
            raise ConfigError(f"GNOSIS_REDIS_MEMORY_LIMIT must be a fraction in (0, 1], got {self.redis_memory_limit}")
        if self.input_store != "redis" and not os.path.isabs(self.input_store):
            raise ConfigError(f"GNOSIS_INPUT_STORE {self.input_store!r} is not `redis` or an absolute directory")
        if self.api_worker_class not in ("gevent", "gthread"):
            raise ConfigError(f"GNOSIS_API_WORKER_CLASS {self.api_worker_class!r} is not gevent or gthread")
        for entry in self.batch_buckets:
            if not entry.startswith("gs://") or len(entry) <= len("gs://"):
                raise ConfigError(f"GNOSIS_BATCH_BUCKETS entry {entry!r} is not a gs://bucket/prefix")
        if self.vision_attention not in ("batched", "windows"):
            raise ConfigError(f"OCR_VISION_ATTENTION {self.vision_attention!r} is not batched or windows")
        if self.cache_verify not in ("quick", "full"):
            raise ConfigError(f"GNOSIS_CACHE_VERIFY {self.cache_verify!r} is not quick or full")
        if "/" not in self.model_id:
            raise ConfigError(f"OCR_MODEL_ID {self.model_id!r} is not an org/name repo id")
        if self.page_hard_time_limit <= self.page_soft_time_limit:
            raise ConfigError("GNOSIS_PAGE_HARD_TIMEOUT must be longer than GNOSIS_PAGE_SOFT_TIMEOUT")
        for name in ("max_upload_bytes", "max_pages", "max_pixels", "page_max_side", "job_ttl", "job_max_age",
                     "max_queued_bytes", "api_connections", "header_timeout", "max_key_pages",
                     "page_soft_time_limit", "page_max_attempts", "lease_ttl", "lease_wait",
                     "download_workers", "download_stall", "max_new_tokens", "heartbeat_interval", "max_queue_depth",
                     "prefill_batch", "reconcile_grace", "max_batch_documents"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def check_cache_writable(self) -> None:
        """Fail fast when the shared cache cannot be written (worker and `cache` commands)."""
        try:
            os.makedirs(self.hub_cache, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"MODEL_CACHE_PATH {self.model_cache_path!r} cannot be created: {exc.strerror}") from exc
        if not os.access(self.hub_cache, os.W_OK | os.X_OK):
            raise ConfigError(f"MODEL_CACHE_PATH {self.model_cache_path!r} is not writable")


def hash_key(key: str) -> str:
    """API keys are kept only as SHA-256 digests."""
    return hashlib.sha256(key.encode()).hexdigest()


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return _number(env, name, default, int, "an integer")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, float, "a number")


def _number(env: Mapping[str, str], name: str, default, cast, what: str):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {what}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean")
