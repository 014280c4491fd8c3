"""Bad and hostile input: each case is a clean 4xx or a failed job with a specific code; nothing crashes."""

from __future__ import annotations

import io
import os
import socket
from urllib.parse import urlparse

import pytest
import redis
import requests
from PIL import Image

from harness.docs import encrypted_pdf, pdf_of_pages, pdf_page_tree_loop, png_pixel_bomb, squash, text_image
from harness.stack import TEST_REDIS_URL, Stack, poll_job

MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module", params=["redis", "directory"])
def api(request, tmp_path_factory):
    """Every hostile input against inputs kept in Redis, then in a shared directory."""
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    s = Stack(tmp_path_factory.mktemp("input"), TEST_REDIS_URL)
    if request.param == "directory":
        s.env["GNOSIS_INPUT_STORE"] = str(tmp_path_factory.mktemp("inputs"))
    url = s.api(GNOSIS_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), GNOSIS_MAX_PAGES="5")
    s.worker(GNOSIS_MAX_PAGES="5")
    yield url
    s.stop()
    redis.Redis.from_url(TEST_REDIS_URL).flushdb()


def _png() -> bytes:
    return text_image(["Hostile input survives"])


def _truncated_png() -> bytes:
    data = _png()
    return data[: len(data) // 2]


def _garbage_after_header() -> bytes:
    return _png()[:33] + os.urandom(4000)


REJECTED = [
    ("empty", b"", 415, "empty_document"),
    ("random bytes", os.urandom(5000), 415, "unsupported_media_type"),
    ("png cut in half", _truncated_png(), 422, "unreadable_document"),
    ("valid header, garbage data", _garbage_after_header(), 422, "unreadable_document"),
    ("60000x60000 png", png_pixel_bomb(), 422, "too_many_pixels"),
    ("pdf over the page limit", pdf_of_pages([[f"page {n}"] for n in range(6)]), 422, "too_many_pages"),
    ("encrypted pdf", encrypted_pdf(), 422, "encrypted_document"),
    ("a text file", b"hello, this is plain text\n" * 20, 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("name,data,status,code", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_with_status_and_code(api, name, data, status, code):
    r = requests.post(f"{api}/v1/jobs", files={"file": ("doc", data)})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]


def test_missing_file_field(api):
    r = requests.post(f"{api}/v1/jobs", files={"document": ("a.png", _png())})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_file"
    r = requests.post(f"{api}/v1/jobs", data=b"not multipart", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_file"


def test_large_document_under_the_limit_is_accepted(api):
    side = 700  # random pixels: a PNG of about 1.5 MB, bigger than any parser buffer
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert 1_000_000 < len(buf.getvalue()) < MAX_UPLOAD
    r = requests.post(f"{api}/v1/jobs", files={"file": ("noise.png", buf.getvalue())})
    assert r.status_code == 202, r.text
    assert poll_job(api, r.json()["id"])["status"] == "succeeded"


def test_upload_over_limit_is_413(api):
    r = requests.post(f"{api}/v1/jobs", files={"file": ("big.png", b"\x89PNG" + b"\0" * (MAX_UPLOAD + 1))})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_413_arrives_before_the_body_is_sent(api):
    # Declare 10 GB and send none of it: the answer must come from the headers alone.
    host, port = urlparse(api).hostname, urlparse(api).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 10000000000\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_chunked_body_over_limit_is_413(api):
    boundary = "xyz"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
               f"Content-Type: image/png\r\n\r\n").encode()
        for _ in range(MAX_UPLOAD // 65536 + 4):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        r = requests.post(f"{api}/v1/jobs", data=body(),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    except requests.ConnectionError:
        pytest.fail("the server dropped the connection instead of answering 413")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"


def _submit_and_wait(api, filename, data, **kwargs):
    r = requests.post(f"{api}/v1/jobs", files={"file": (filename, data, *kwargs.values())})
    assert r.status_code == 202, r.text
    return r.json(), poll_job(api, r.json()["id"], timeout=60)


def test_pdf_whose_page_tree_loops_fails_cleanly(api):
    r = requests.post(f"{api}/v1/jobs", files={"file": ("loop.pdf", pdf_page_tree_loop())})
    if r.status_code == 202:
        final = poll_job(api, r.json()["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "unreadable_document", final
    else:
        assert r.status_code == 422 and r.json()["error"]["code"] in ("unreadable_document", "no_pages")


def test_jpeg_declared_as_pdf_is_recognised_by_content(api):
    jpeg = text_image(["Content beats the label"], fmt="JPEG")
    job, final = _submit_and_wait(api, "report.pdf", jpeg, content_type="application/pdf")
    assert final["status"] == "succeeded"
    text = requests.get(f"{api}/v1/jobs/{job['id']}/result").json()["text"]
    assert "contentbeatsthelabel" in squash(text)


@pytest.mark.parametrize("filename,base", [
    ("../../etc/passwd\x00.png", "passwd.png"),
    ("..\\..\\windows\\evil.png", "evil.png"),
    ("/abs/path/.hidden.png", "hidden.png"),
    ("tab\there\x1b[31m.png", "here"),
    ("reçu-№42 договор 契約.png", "reçu-№42 договор 契約.png"),
])
def test_filenames_are_cleaned_not_trusted(api, filename, base):
    job, final = _submit_and_wait(api, filename, _png())
    shown = job["filename"]
    # What must hold whatever the multipart parser makes of escapes (Werkzeug 3.1.9 reads "\\" in a
    # quoted filename as an escape): no path, no separator, no leading dot, no control character.
    assert not {"/", "\\"} & set(shown) and not shown.startswith(".")
    assert all(ch.isprintable() for ch in shown), shown
    assert base in shown and ".." not in shown
    assert final["status"] == "succeeded"


def test_other_jobs_unaffected_by_hostile_ones(api):
    for _, data, _, _ in REJECTED:
        requests.post(f"{api}/v1/jobs", files={"file": ("doc", data)})
    job, final = _submit_and_wait(api, "ok.png", _png())
    assert final["status"] == "succeeded"
    assert requests.get(f"{api}/readyz").status_code == 200


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP", "BMP"])
def test_every_supported_image_format(api, fmt):
    job, final = _submit_and_wait(api, f"page.{fmt.lower()}", text_image(["Format check passes"], fmt=fmt))
    assert final["status"] == "succeeded", final
    assert "formatcheckpasses" in squash(requests.get(f"{api}/v1/jobs/{job['id']}/result").json()["text"])


def many_frame_tiff(frames: int) -> bytes:
    """A TIFF of `frames` 1x1 grey frames, each a 102-byte IFD chained to the next (what Pillow would
    take seconds to write, written directly)."""
    import struct

    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(frames):
        start = len(out)
        pixel = start + 2 + 8 * 12 + 4  # the frame's one pixel, right after its IFD
        nxt = 0 if i == frames - 1 else pixel + 1
        tags = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                (273, 4, 1, pixel), (278, 3, 1, 1), (279, 4, 1, 1)]
        out += struct.pack("<H", len(tags))
        for tag, typ, count, value in tags:
            out += struct.pack("<HHII", tag, typ, count, value)
        out += struct.pack("<I", nxt) + b"\x80"
    return bytes(out)


def lying_pdf(claimed: int) -> bytes:
    """One real page under a page tree that claims `claimed` pages."""
    from harness.docs import pdf_with_objects

    return pdf_with_objects([b"<< /Type /Catalog /Pages 2 0 R >>",
                             b"<< /Type /Pages /Kids [3 0 R] /Count %d >>" % claimed,
                             b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"])


def test_counting_frames_stops_past_the_page_limit(monkeypatch):
    from PIL import TiffImagePlugin

    from gnosis_ocr import document
    from gnosis_ocr.errors import UnreadableDocument

    tiff = many_frame_tiff(100_000)
    seeks = []
    real_seek = TiffImagePlugin.TiffImageFile.seek
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "seek", lambda self, f: (seeks.append(f), real_seek(self, f))[1])
    with pytest.raises(UnreadableDocument) as refused:
        document.inspect(tiff, max_pages=100, max_pixels=10**6)
    assert refused.value.code == "too_many_pages"
    assert max(seeks) <= 101  # the 100,001st frame and beyond were never looked at


def test_a_many_frame_tiff_is_refused_at_submit(api):
    r = requests.post(f"{api}/v1/jobs", files={"file": ("frames.tiff", many_frame_tiff(15_000))})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_pages"
    assert "more than 5" in r.json()["error"]["message"]


def test_a_pdf_claiming_pages_it_lacks_is_refused_before_anything_is_queued(api):
    depth = redis.Redis.from_url(TEST_REDIS_URL).llen("ocr")
    r = requests.post(f"{api}/v1/jobs", files={"file": ("liar.pdf", lying_pdf(4))})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unreadable_document", r.text
    assert "page 2 does not exist" in r.json()["error"]["message"]
    assert redis.Redis.from_url(TEST_REDIS_URL).llen("ocr") == depth


def test_a_413_says_which_limit_was_hit(api):
    parts = {f"extra{i}": "x" for i in range(40)}
    r = requests.post(f"{api}/v1/jobs", files={"file": ("a.png", _png())}, data=parts)
    assert r.status_code == 413 and "more than 16 parts" in r.json()["error"]["message"], r.text
    r = requests.post(f"{api}/v1/jobs", files={"file": ("a.png", _png())}, data={"callback_url": "x" * 1_000_000})
    assert r.status_code == 413 and "form field" in r.json()["error"]["message"], r.text
    r = requests.post(f"{api}/v1/jobs", files={"file": ("a.png", b"\0" * (MAX_UPLOAD + 1))})
    assert r.status_code == 413 and "request body is" in r.json()["error"]["message"], r.text


def raw_request(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
        s.sendall(data)
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /v1/jobs/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n", 431),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n", 431),
])
def test_errors_the_http_server_answers_itself_are_json_too(api, request_bytes, status):
    got, headers, body = raw_request(api, request_bytes)
    assert got == status, body
    assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
    error = __import__("json").loads(body)["error"]
    assert error["code"] and error["message"]


def test_every_response_says_nosniff(api):
    job, final = _submit_and_wait(api, "a.png", _png())
    for path in ("/healthz", "/readyz", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/result?format=markdown",
                 "/v1/jobs/" + "0" * 32, "/metrics", "/openapi.json"):
        assert requests.get(api + path).headers.get("X-Content-Type-Options") == "nosniff", path
