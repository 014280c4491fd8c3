"""One error tree. Each error carries its API code and HTTP status, and survives pickling.

Errors also subclass the builtin they resemble, so callers that know nothing of
gnosis-ocr can still catch them (`except FileNotFoundError`, `except TimeoutError`).
"""

from __future__ import annotations


class GnosisError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def __reduce__(self):
        # Keyword-only arguments are lost by Exception's default pickling.
        return (_rebuild, (type(self), self.message, self.code, self.retry_after))

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def _rebuild(cls, message, code, retry_after):
    return cls(message, code=code, retry_after=retry_after)


class ConfigError(GnosisError, ValueError):
    code = "invalid_configuration"


class BadRequest(GnosisError, ValueError):
    code = "bad_request"
    status = 400


class Unauthorized(GnosisError, PermissionError):
    code = "unauthorized"
    status = 401


class Forbidden(GnosisError, PermissionError):
    code = "forbidden"
    status = 403


class TooLarge(GnosisError, ValueError):
    code = "too_large"
    status = 413


class UnsupportedDocument(GnosisError, ValueError):
    code = "unsupported_media_type"
    status = 415


class UnreadableDocument(GnosisError, ValueError):
    code = "unreadable_document"
    status = 422


class NotFound(GnosisError, LookupError):
    code = "not_found"
    status = 404


class Conflict(GnosisError):
    code = "conflict"
    status = 409


class Unavailable(GnosisError, ConnectionError):
    code = "queue_unavailable"
    status = 503


class QueueFull(GnosisError):
    code = "queue_full"
    status = 429


class ModelCacheError(GnosisError, OSError):
    code = "model_unavailable"
    status = 503


class LeaseLost(ModelCacheError):
    code = "lease_lost"


class CacheUnreadable(ModelCacheError):
    """This host cannot read the cache (EIO, ENOTCONN: a FUSE mount gone bad): unavailable here, which
    says nothing about the files themselves, so nothing is marked corrupt or repaired for it."""

    code = "cache_unreadable"


class DownloadTimeout(ModelCacheError, TimeoutError):
    code = "download_timeout"


class DownloadStalled(ModelCacheError, TimeoutError):
    code = "download_stalled"


class PageTimeout(GnosisError, TimeoutError):
    """A page ran past its time limit; the engine stopped it and its job fails."""

    code = "timeout"
    status = 504


class EngineDead(GnosisError, RuntimeError):
    """The engine can no longer run pages (its loop died, or its device is unusable): pages go back to
    the queue for another worker, and this worker exits so that its supervisor starts a fresh one."""

    code = "engine_dead"
    status = 503
    on_device = True
    """Raised for a page that was on the device when it died: one of them may have caused it (docs/gpu.md)."""


class EngineDeadWithoutPage(EngineDead):
    """The engine died while this page waited for it, or another device of the process died: the page had
    no part in it."""

    on_device = False


class EngineCheckFailed(GnosisError, RuntimeError):
    """The engine's start-up self-check failed (a replayed decode graph differs from the eager step):
    the worker refuses to start rather than serve wrong text."""

    code = "engine_check_failed"
