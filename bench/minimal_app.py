"""The submit-throughput floor: a minimal Flask handler that only stores the upload in Redis,
served by exactly the API's gunicorn configuration."""

from __future__ import annotations

import os

if os.environ.get("GNOSIS_API_WORKER_CLASS", "gevent") == "gevent":  # as `gnosis-ocr api` does, before imports
    from gevent import monkey

    monkey.patch_all()

import uuid  # noqa: E402

import redis  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402

from gnosis_ocr.api.server import ApiServer  # noqa: E402
from gnosis_ocr.settings import Settings  # noqa: E402


def create_minimal_app(redis_url: str) -> Flask:
    app = Flask(__name__)
    client = redis.Redis.from_url(redis_url)

    @app.post("/v1/jobs")
    def submit():
        job_id = uuid.uuid4().hex
        client.set(f"minimal:{job_id}", request.files["file"].read(), ex=3600)
        return jsonify({"id": job_id}), 202

    return app


class MinimalServer(ApiServer):
    def load(self):
        return create_minimal_app(self.settings.redis_url)


if __name__ == "__main__":
    import sys

    MinimalServer(Settings.from_env(), host="127.0.0.1", port=int(sys.argv[1]),
                  workers=int(os.environ.get("GNOSIS_API_WORKERS", "2")),
                  threads=int(os.environ.get("GNOSIS_API_THREADS", "16"))).run()
