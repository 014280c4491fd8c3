"""One way to reach Redis for every part of the service: a plain URL, or a Sentinel-managed primary.

    REDIS_URL=redis://host:6379/0
    REDIS_URL=sentinel://[:password@]sentinel1:26379,sentinel2:26379,sentinel3:26379/<master name>/<db>

With Sentinel, the job store, metrics, the download lease and Celery's broker all ask the sentinels
for the current primary and ask again after a connection error, so after a failover everything
follows the new primary. The password, if any, is the data nodes' (the sentinels are reached
without one). Redis Cluster is not supported: Celery's Redis transport cannot use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlparse

import redis
from redis.sentinel import Sentinel

from .errors import ConfigError


def redact(url: str) -> str:
    """The URL with its password replaced: what logs and error messages may show."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}"


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    password: str | None


def parse_sentinel(url: str) -> SentinelTarget:
    parsed = urlparse(url)
    password = unquote(parsed.password) if parsed.password else None
    hosts = parsed.netloc.rsplit("@", 1)[-1]
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        if not host:
            raise ConfigError(f"REDIS_URL {redact(url)!r} names a sentinel without a host")
        try:
            sentinels.append((host.strip("[]"), int(port or 26379)))
        except ValueError:
            raise ConfigError(f"REDIS_URL {redact(url)!r} has an invalid sentinel port {port!r}") from None
    parts = [p for p in parsed.path.split("/") if p]
    if not parts:
        raise ConfigError(f"REDIS_URL {redact(url)!r} must name the Sentinel master: sentinel://host:26379/<master>/<db>")
    try:
        db = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ConfigError(f"REDIS_URL {redact(url)!r} has an invalid database number {parts[1]!r}") from None
    return SentinelTarget(tuple(sentinels), parts[0], db, password)


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def connect(url: str, **kwargs) -> redis.Redis:
    """A client for REDIS_URL; `kwargs` are redis-py connection options (timeouts, retry, pool size)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    target = parse_sentinel(url)
    timeouts = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs}
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=timeouts)
    return sentinel.master_for(target.master, db=target.db, password=target.password, **kwargs)


def sentinels(url: str, *, timeout: float) -> tuple[str, list[redis.Redis]]:
    """With a Sentinel REDIS_URL: the master's name and a client for each sentinel."""
    target = parse_sentinel(url)
    return target.master, [redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)
                           for host, port in target.sentinels]


def celery_broker(url: str) -> tuple[str, dict]:
    """Celery's broker URL and extra transport options for REDIS_URL."""
    if not is_sentinel(url):
        return url, {}
    target = parse_sentinel(url)
    # Quoted: a password with '/', '#', ';' or '?' would otherwise end the URL's authority or list.
    auth = f":{quote(target.password, safe='')}@" if target.password else ""
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels)
    return broker, {"master_name": target.master}
