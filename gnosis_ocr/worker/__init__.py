"""The worker process: Celery tasks, the engines and the shared model cache.

A worker never talks to the hub. The one download runs in a short-lived child
process (see `fetch.py`); this process loads only from a snapshot path, with
HF_HUB_OFFLINE set here, before anything can import huggingface_hub.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
