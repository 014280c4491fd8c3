"""gnosis-ocr: asynchronous OCR with a Flask API, Celery workers and one shared model cache.

The public Python surface is small: the HTTP client, the settings object and the error tree.
Importing this package imports none of the heavy parts (no torch, no engine, no Celery worker).
"""

from .errors import GnosisError
from .settings import Settings

__version__ = "0.1.0"
__all__ = ["ApiError", "Client", "GnosisError", "Settings", "__version__"]


def __getattr__(name: str):
    # The client imports requests (and with it ssl) only when used: `gnosis-ocr api` must be able to
    # patch ssl and sockets for gevent before anything imports them.
    if name in ("ApiError", "Client"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'gnosis_ocr' has no attribute {name!r}")
