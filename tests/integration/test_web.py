"""The web page, in headless Chromium: upload a generated image, watch it finish, read its text."""

from __future__ import annotations

import shutil

import pytest

from harness.docs import squash, text_image
from harness.stack import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_drop_a_page_and_read_its_markdown(stack, tmp_path):
    from playwright.sync_api import sync_playwright

    url = stack.api()
    stack.worker()
    page_file = tmp_path / "invoice.png"
    page_file.write_bytes(text_image(["Invoice from the browser", "Total due 42 EUR"]))
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/")
            assert page.title() == "gnosis-ocr"
            page.set_input_files("#file", str(page_file))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            assert page.inner_text("#status") == "succeeded"
            assert page.inner_text("#pages") == "1 of 1 page done"
            rendered = page.inner_text("#rendered")
            assert "invoicefromthebrowser" in squash(rendered) and "totaldue42eur" in squash(rendered)
            page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

            page.click("#toggle")
            assert "invoicefromthebrowser" in squash(page.inner_text("#source"))
            assert not errors, errors
        finally:
            browser.close()


def test_page_is_served_with_a_strict_content_security_policy(stack):
    import requests

    url = stack.api()
    r = requests.get(url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["Content-Type"]
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert requests.get(url + "/static/app.js").status_code == 200
