"""The web page at `/`: plain HTML and JS served by the API, no build step."""

from __future__ import annotations

from flask import Blueprint, current_app

bp = Blueprint("ui", __name__)

# Scripts and styles only from this origin: OCR output is rendered in this page.
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; " \
      "base-uri 'none'; frame-ancestors 'none'"


@bp.get("/")
def index():
    response = current_app.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
