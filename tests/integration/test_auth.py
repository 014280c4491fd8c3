"""API keys (hashed, per-key job visibility) and Idempotency-Key."""

from __future__ import annotations

import threading

import requests

from harness.docs import text_image


def _post(url, data, *, key=None, idem=None):
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if idem:
        headers["Idempotency-Key"] = idem
    return requests.post(f"{url}/v1/jobs", files={"file": ("a.png", data)}, headers=headers)


def test_api_keys_gate_jobs_and_scope_them_to_their_key(stack):
    url = stack.api(GNOSIS_API_KEYS="alpha-key, beta-key")
    doc = text_image(["secret page"])
    r = _post(url, doc)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert _post(url, doc, key="wrong").status_code == 401
    assert requests.get(f"{url}/v1/cache").status_code == 401

    job = _post(url, doc, key="alpha-key").json()
    mine = requests.get(f"{url}/v1/jobs/{job['id']}", headers={"Authorization": "Bearer alpha-key"})
    assert mine.status_code == 200
    theirs = requests.get(f"{url}/v1/jobs/{job['id']}", headers={"X-API-Key": "beta-key"})
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "not_found"
    assert requests.delete(f"{url}/v1/jobs/{job['id']}", headers={"X-API-Key": "beta-key"}).status_code == 404

    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert requests.get(url + path).status_code == 200, path
    # Keys are never stored in clear.
    assert not any(b"alpha-key" in (stack.redis.dump(k) or b"") for k in stack.redis.scan_iter("*"))


def test_metrics_can_require_a_key(stack):
    url = stack.api(GNOSIS_API_KEYS="alpha-key", GNOSIS_METRICS_OPEN="false")
    assert requests.get(url + "/metrics").status_code == 401
    assert requests.get(url + "/metrics", headers={"X-API-Key": "alpha-key"}).status_code == 200
    assert requests.get(url + "/healthz").status_code == 200


def test_idempotency_key_returns_the_original_job(stack):
    url = stack.api()
    doc = text_image(["pay once"])
    first = _post(url, doc, idem="order-17")
    assert first.status_code == 202
    again = _post(url, doc, idem="order-17")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = _post(url, text_image(["another document"]), idem="order-17")
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert _post(url, doc, idem="order-18").json()["id"] != first.json()["id"]
    assert _post(url, doc, idem="x" * 201).status_code == 400


def test_racing_idempotent_requests_create_one_job(stack):
    url = stack.api()
    doc = text_image(["racing requests"])
    answers = []

    def go():
        answers.append(_post(url, doc, idem="race-1"))

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.json()["id"] for r in answers} == {answers[0].json()["id"]}
    assert sorted(r.status_code for r in answers) == [200] * 5 + [202]
    assert len(list(stack.redis.scan_iter("gnosis:job:*:input"))) == 1


def test_idempotency_key_expires_with_its_job(stack):
    url = stack.api()
    doc = text_image(["gone with the job"])
    job = _post(url, doc, idem="temp-1").json()
    assert requests.delete(f"{url}/v1/jobs/{job['id']}").status_code == 204
    fresh = _post(url, doc, idem="temp-1")
    assert fresh.status_code == 202 and fresh.json()["id"] != job["id"]
