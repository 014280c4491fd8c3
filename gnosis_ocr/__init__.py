"""gnosis-ocr: asynchronous OCR with a Flask API, Celery workers and one shared model cache.

The public Python surface is small: the HTTP client, the settings object and the error tree.
Importing this package imports none of the heavy parts (no torch, no engine, no Celery worker).
"""

from .client import ApiError, Client
from .errors import GnosisError
from .settings import Settings

__version__ = "0.1.0"
__all__ = ["ApiError", "Client", "GnosisError", "Settings", "__version__"]
