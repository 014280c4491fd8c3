"""Options on a job: only the pages asked for are rendered, queued and returned (numbered as in the
document), and the CPU engine reads the language asked for, checked against what the workers have."""

from __future__ import annotations

import requests

from harness.docs import pdf_of_pages, text_image, words
from harness.stack import poll_job, wait_until

PAGES = [[f"Option page {w}", f"{w} apples on the table"] for w in ("one", "two", "three", "four")]


def test_only_the_pages_asked_for_are_read_and_numbered_as_in_the_document(stack):
    url = stack.api()
    stack.worker()
    r = requests.post(f"{url}/v1/jobs", files={"file": ("four.pdf", pdf_of_pages(PAGES))}, data={"pages": "2, 4"})
    assert r.status_code == 202, r.text
    assert r.json()["pages_total"] == 2
    assert poll_job(url, r.json()["id"])["status"] == "succeeded"
    result = requests.get(f"{url}/v1/jobs/{r.json()['id']}/result").json()
    assert [p["page"] for p in result["pages"]] == [2, 4]
    assert {"two", "apples"} <= words(result["pages"][0]["text"]) and "four" in words(result["pages"][1]["text"])
    assert "one" not in words(result["text"]) and "three" not in words(result["text"])
    assert result["options"] == {"pages": "2, 4", "language": None}
    assert result["model"]["id"] == "tesseract"


def test_bad_page_selections_are_refused_and_store_nothing(stack):
    url = stack.api()
    pdf = pdf_of_pages(PAGES)
    for pages, status, code in (("2-a", 400, "invalid_parameter"), ("0", 400, "invalid_parameter"),
                                ("3-1", 400, "invalid_parameter"), ("", 400, "invalid_parameter"),
                                ("2,9", 422, "page_out_of_range")):
        r = requests.post(f"{url}/v1/jobs", files={"file": ("four.pdf", pdf)}, data={"pages": pages})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (pages, r.text)
    assert not list(stack.redis.scan_iter("gnosis:job:*"))


def test_a_language_is_checked_against_the_workers_and_read_by_tesseract(stack):
    url = stack.api()
    image = text_image(["Language checked page", "English words only"])
    # No worker has said what it reads yet: a well-formed code is taken, and the worker refuses it.
    early = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", image)}, data={"language": "deu"}).json()
    stack.worker()
    final = poll_job(url, early["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "unsupported_language", final
    assert "eng" in final["error"]["message"]

    def refused():
        r = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", image)}, data={"language": "deu+eng"})
        return r.status_code == 400 and r.json()["error"]
    error = wait_until(refused, timeout=30, message="the API to know the workers' languages")
    assert error["code"] == "unsupported_language" and "deu" in error["message"] and "eng" in error["message"]
    r = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", image)}, data={"language": "en g"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_parameter")

    ok = requests.post(f"{url}/v1/jobs", files={"file": ("a.png", image)}, data={"language": "eng"}).json()
    assert poll_job(url, ok["id"])["status"] == "succeeded"
    result = requests.get(f"{url}/v1/jobs/{ok['id']}/result").json()
    assert result["options"]["language"] == "eng" and {"language", "checked"} <= words(result["text"])
