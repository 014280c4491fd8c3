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


def _setting(env: str, default, **extra):
    """A field read from the environment variable `env`, parsed as the field's declared type (int,
    float, bool, str, or a comma-separated tuple of str)."""
    return field(default=default, metadata={"env": env, **extra})


@dataclass(frozen=True)
class Settings:
    """Each field is named after its variable (without the GNOSIS_ or OCR_ prefix, lowercase) and its
    default is `defaults.DEFAULT_<NAME>`, with its unit there."""

    redis_url: str = _setting("REDIS_URL", defaults.DEFAULT_REDIS_URL)
    model_cache_path: str = _setting("MODEL_CACHE_PATH", defaults.DEFAULT_MODEL_CACHE_PATH)
    model_id: str = _setting("OCR_MODEL_ID", defaults.DEFAULT_MODEL_ID)
    model_revision: str = _setting("OCR_MODEL_REVISION", defaults.DEFAULT_MODEL_REVISION)
    engine: str = _setting("OCR_ENGINE", defaults.DEFAULT_ENGINE)
    device: tuple[str, ...] = _setting("OCR_DEVICE", defaults.DEFAULT_DEVICE)
    max_new_tokens: int = _setting("OCR_MAX_NEW_TOKENS", defaults.DEFAULT_MAX_NEW_TOKENS)
    threads: int = _setting("OCR_THREADS", defaults.DEFAULT_THREADS)
    batch_size: int = _setting("OCR_BATCH_SIZE", defaults.DEFAULT_BATCH_SIZE)
    prefill_batch: int = _setting("OCR_PREFILL_BATCH", defaults.DEFAULT_PREFILL_BATCH)
    prefill_gather_ms: int = _setting("OCR_PREFILL_GATHER_MS", defaults.DEFAULT_PREFILL_GATHER_MS)
    prefill_concurrent: str = _setting("OCR_PREFILL_CONCURRENT", defaults.DEFAULT_PREFILL_CONCURRENT)
    repetition_window: int = _setting("OCR_REPETITION_WINDOW", defaults.DEFAULT_REPETITION_WINDOW)
    vision_attention: str = _setting("OCR_VISION_ATTENTION", defaults.DEFAULT_VISION_ATTENTION)
    decode_attention: str = _setting("OCR_DECODE_ATTENTION", defaults.DEFAULT_DECODE_ATTENTION)
    max_upload_bytes: int = _setting("GNOSIS_MAX_UPLOAD_BYTES", defaults.DEFAULT_MAX_UPLOAD_BYTES)
    max_pages: int = _setting("GNOSIS_MAX_PAGES", defaults.DEFAULT_MAX_PAGES)
    max_pixels: int = _setting("GNOSIS_MAX_PIXELS", defaults.DEFAULT_MAX_PIXELS)
    page_max_side: int = _setting("GNOSIS_PAGE_MAX_SIDE", defaults.DEFAULT_PAGE_MAX_SIDE)
    job_ttl: int = _setting("GNOSIS_JOB_TTL", defaults.DEFAULT_JOB_TTL)
    job_max_age: int = _setting("GNOSIS_JOB_MAX_AGE", defaults.DEFAULT_JOB_MAX_AGE)
    max_queued_bytes: int = _setting("GNOSIS_MAX_QUEUED_BYTES", defaults.DEFAULT_MAX_QUEUED_BYTES)
    redis_memory_limit: float = _setting("GNOSIS_REDIS_MEMORY_LIMIT", defaults.DEFAULT_REDIS_MEMORY_LIMIT)
    reconcile_grace: float = _setting("GNOSIS_RECONCILE_GRACE", defaults.DEFAULT_RECONCILE_GRACE)
    input_cache_bytes: int = _setting("GNOSIS_INPUT_CACHE_BYTES", defaults.DEFAULT_INPUT_CACHE_BYTES)
    input_cache_dir: str = _setting("GNOSIS_INPUT_CACHE_DIR", defaults.DEFAULT_INPUT_CACHE_DIR)
    redis_retry: float = _setting("GNOSIS_REDIS_RETRY", defaults.DEFAULT_REDIS_RETRY)
    api_connections: int = _setting("GNOSIS_API_CONNECTIONS", defaults.DEFAULT_API_CONNECTIONS)
    header_timeout: int = _setting("GNOSIS_HEADER_TIMEOUT", defaults.DEFAULT_HEADER_TIMEOUT)
    api_worker_class: str = _setting("GNOSIS_API_WORKER_CLASS", defaults.DEFAULT_API_WORKER_CLASS)
    max_key_pages: int = _setting("GNOSIS_MAX_KEY_PAGES", defaults.DEFAULT_MAX_KEY_PAGES)
    input_store: str = _setting("GNOSIS_INPUT_STORE", defaults.DEFAULT_INPUT_STORE)
    page_soft_timeout: int = _setting("GNOSIS_PAGE_SOFT_TIMEOUT", defaults.DEFAULT_PAGE_SOFT_TIMEOUT)
    page_hard_timeout: int = _setting("GNOSIS_PAGE_HARD_TIMEOUT", defaults.DEFAULT_PAGE_HARD_TIMEOUT)
    page_max_attempts: int = _setting("GNOSIS_PAGE_MAX_ATTEMPTS", defaults.DEFAULT_PAGE_MAX_ATTEMPTS)
    prefetch_pages: int = _setting("GNOSIS_PREFETCH_PAGES", defaults.DEFAULT_PREFETCH_PAGES)
    queue: str = _setting("GNOSIS_QUEUE", defaults.DEFAULT_QUEUE)
    redis_timeout: float = _setting("GNOSIS_REDIS_TIMEOUT", defaults.DEFAULT_REDIS_TIMEOUT)
    retry_after: int = _setting("GNOSIS_RETRY_AFTER", defaults.DEFAULT_RETRY_AFTER)
    accept_replicas: str = _setting("GNOSIS_ACCEPT_REPLICAS", defaults.DEFAULT_ACCEPT_REPLICAS)
    accept_replicas_wait: float = _setting("GNOSIS_ACCEPT_REPLICAS_WAIT", defaults.DEFAULT_ACCEPT_REPLICAS_WAIT)
    lease_ttl: int = _setting("GNOSIS_LEASE_TTL", defaults.DEFAULT_LEASE_TTL)
    lease_wait: int = _setting("GNOSIS_LEASE_WAIT", defaults.DEFAULT_LEASE_WAIT)
    download_workers: int = _setting("GNOSIS_DOWNLOAD_WORKERS", defaults.DEFAULT_DOWNLOAD_WORKERS)
    download_stall_timeout: float = _setting("GNOSIS_DOWNLOAD_STALL_TIMEOUT", defaults.DEFAULT_DOWNLOAD_STALL_TIMEOUT)
    cache_verify: str = _setting("GNOSIS_CACHE_VERIFY", defaults.DEFAULT_CACHE_VERIFY)
    cache_visibility_wait: float = _setting("GNOSIS_CACHE_VISIBILITY_WAIT", defaults.DEFAULT_CACHE_VISIBILITY_WAIT)
    heartbeat_interval: float = _setting("GNOSIS_HEARTBEAT_INTERVAL", defaults.DEFAULT_HEARTBEAT_INTERVAL)
    loop_stall_timeout: float = _setting("GNOSIS_LOOP_STALL_TIMEOUT", defaults.DEFAULT_LOOP_STALL_TIMEOUT)
    max_queue_depth: int = _setting("GNOSIS_MAX_QUEUE_DEPTH", defaults.DEFAULT_MAX_QUEUE_DEPTH)
    worker_port: int = _setting("GNOSIS_WORKER_PORT", defaults.DEFAULT_WORKER_PORT)
    null_engine_delay: float = _setting("GNOSIS_NULL_ENGINE_DELAY", defaults.DEFAULT_NULL_ENGINE_DELAY)
    webhook_secret: str = _setting("GNOSIS_WEBHOOK_SECRET", defaults.DEFAULT_WEBHOOK_SECRET)
    webhook_allow_private: bool = _setting("GNOSIS_WEBHOOK_ALLOW_PRIVATE", defaults.DEFAULT_WEBHOOK_ALLOW_PRIVATE)
    webhook_max_attempts: int = _setting("GNOSIS_WEBHOOK_MAX_ATTEMPTS", defaults.DEFAULT_WEBHOOK_MAX_ATTEMPTS)
    webhook_backoff: float = _setting("GNOSIS_WEBHOOK_BACKOFF", defaults.DEFAULT_WEBHOOK_BACKOFF)
    webhook_timeout: float = _setting("GNOSIS_WEBHOOK_TIMEOUT", defaults.DEFAULT_WEBHOOK_TIMEOUT)
    batch_buckets: tuple[str, ...] = _setting("GNOSIS_BATCH_BUCKETS", defaults.DEFAULT_BATCH_BUCKETS)
    max_batch_documents: int = _setting("GNOSIS_MAX_BATCH_DOCUMENTS", defaults.DEFAULT_MAX_BATCH_DOCUMENTS)
    bucket_timeout: float = _setting("GNOSIS_BUCKET_TIMEOUT", defaults.DEFAULT_BUCKET_TIMEOUT)
    listing_threads: int = _setting("GNOSIS_LISTING_THREADS", defaults.DEFAULT_LISTING_THREADS)
    api_key_hashes: frozenset[str] = field(default=frozenset(), metadata={"env": "GNOSIS_API_KEYS", "secret": True})
    """SHA-256 digests of the keys GNOSIS_API_KEYS lists: the keys themselves are never kept."""
    metrics_open: bool = _setting("GNOSIS_METRICS_OPEN", defaults.DEFAULT_METRICS_OPEN)

    def __post_init__(self) -> None:
        if not self.page_hard_timeout:
            object.__setattr__(self, "page_hard_timeout", self.page_soft_timeout + defaults.PAGE_HARD_TIMEOUT_GRACE)

    @property
    def hub_cache(self) -> str:
        return os.path.join(self.model_cache_path, "hub")

    @property
    def visibility_timeout(self) -> int:
        """Seconds before the broker redelivers an unacknowledged task: always past its hard limit."""
        return self.page_hard_timeout * 2 + 60

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if f.name == "api_key_hashes":
                listed = [k.strip() for k in env.get(name, "").split(",") if k.strip()]
                values[f.name] = frozenset(hash_key(k) for k in listed)
            else:
                values[f.name] = _parse(env, name, f.default, f.type)
        settings = cls(**values)
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
        for device in self.device:
            if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
                raise ConfigError(f"OCR_DEVICE {device!r} is not auto, cpu, cuda or cuda:N (or a comma-separated list)")
        for name in ("batch_size", "repetition_window", "prefetch_pages", "input_cache_bytes", "redis_retry", "threads",
                     "cache_visibility_wait", "null_engine_delay", "webhook_backoff", "worker_port"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_variable(name)} must not be negative, got {getattr(self, name)}")
        if not 0 < self.redis_memory_limit <= 1:
            raise ConfigError(f"GNOSIS_REDIS_MEMORY_LIMIT must be a fraction in (0, 1], got {self.redis_memory_limit}")
        if self.worker_port > 65535:
            raise ConfigError(f"GNOSIS_WORKER_PORT must be a port number (0 for none), got {self.worker_port}")
        if self.input_store != "redis" and not os.path.isabs(self.input_store):
            raise ConfigError(f"GNOSIS_INPUT_STORE {self.input_store!r} is not `redis` or an absolute directory")
        if self.api_worker_class not in ("gevent", "gthread"):
            raise ConfigError(f"GNOSIS_API_WORKER_CLASS {self.api_worker_class!r} is not gevent or gthread")
        for entry in self.batch_buckets:
            if not entry.startswith("gs://") or len(entry) <= len("gs://"):
                raise ConfigError(f"GNOSIS_BATCH_BUCKETS entry {entry!r} is not a gs://bucket/prefix")
        if self.vision_attention not in ("batched", "windows"):
            raise ConfigError(f"OCR_VISION_ATTENTION {self.vision_attention!r} is not batched or windows")
        if self.decode_attention not in ("flash", "sdpa"):
            raise ConfigError(f"OCR_DECODE_ATTENTION {self.decode_attention!r} is not flash or sdpa")
        if self.prefill_concurrent not in ("auto", "on", "off"):
            raise ConfigError(f"OCR_PREFILL_CONCURRENT {self.prefill_concurrent!r} is not auto, on or off")
        if self.cache_verify not in ("quick", "full"):
            raise ConfigError(f"GNOSIS_CACHE_VERIFY {self.cache_verify!r} is not quick or full")
        if "/" not in self.model_id:
            raise ConfigError(f"OCR_MODEL_ID {self.model_id!r} is not an org/name repo id")
        if self.page_hard_timeout <= self.page_soft_timeout:
            raise ConfigError("GNOSIS_PAGE_HARD_TIMEOUT must be longer than GNOSIS_PAGE_SOFT_TIMEOUT")
        for name in ("max_upload_bytes", "max_pages", "max_pixels", "page_max_side", "job_ttl", "job_max_age",
                     "max_queued_bytes", "api_connections", "header_timeout", "max_key_pages",
                     "page_soft_timeout", "page_max_attempts", "lease_ttl", "lease_wait",
                     "download_workers", "download_stall_timeout", "max_new_tokens", "heartbeat_interval",
                     "max_queue_depth",
                     "prefill_batch", "reconcile_grace", "max_batch_documents", "redis_timeout", "retry_after",
                     "webhook_max_attempts", "webhook_timeout", "bucket_timeout", "listing_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_variable(name)} must be positive, got {getattr(self, name)}")
        if self.loop_stall_timeout < 0:
            raise ConfigError(f"GNOSIS_LOOP_STALL_TIMEOUT must be 0 (off) or positive, got {self.loop_stall_timeout}")
        if self.prefill_gather_ms < 0:
            raise ConfigError(f"OCR_PREFILL_GATHER_MS must be 0 (off) or positive, got {self.prefill_gather_ms}")
        from .replication import parse  # here: it imports redis, which the API imports only after gevent patches

        try:
            replicas = parse(self.accept_replicas)
        except ValueError:
            raise ConfigError(f"GNOSIS_ACCEPT_REPLICAS {self.accept_replicas!r} is not a number of replicas "
                              "(0 for none) or `connected`") from None
        if replicas != 0 and not 0 < self.accept_replicas_wait < self.redis_timeout:
            # WAIT holds the connection: past the socket's timeout the client would give up on it first.
            raise ConfigError(f"GNOSIS_ACCEPT_REPLICAS_WAIT must be positive and shorter than GNOSIS_REDIS_TIMEOUT "
                              f"({self.redis_timeout:g}), got {self.accept_replicas_wait:g}")

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


def _variable(name: str) -> str:
    """The environment variable a field is read from: what an operator set, and what an error names."""
    return next(f.metadata["env"] for f in dataclasses.fields(Settings) if f.name == name)


def _parse(env: Mapping[str, str], name: str, default, kind: str):
    """The variable as the field's declared type (`kind`, its annotation as written)."""
    if kind == "bool":
        return _bool(env, name, default)
    if kind == "int":
        return _int(env, name, default)
    if kind == "float":
        return _float(env, name, default)
    if kind.startswith("tuple["):
        return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip()) or default
    if kind == "str":
        return env.get(name, default)
    raise TypeError(f"Settings cannot read a {kind} from {name}")


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
