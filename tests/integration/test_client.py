"""`gnosis-ocr submit` and the Python client: progress, results, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from gnosis_ocr.client import ApiError, Client
from harness.docs import pdf_of_pages, squash, text_image
from harness.stack import ROOT


def run_submit(stack, url, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "submit", "--url", url, *args], cwd=ROOT,
                          env=stack.env, capture_output=True, text=True, timeout=timeout)


def test_submit_wait_prints_markdown_and_plain_progress(stack, tmp_path):
    url = stack.api()
    stack.worker()
    doc = tmp_path / "memo.pdf"
    doc.write_bytes(pdf_of_pages([["First memo page"], ["Second memo page"]]))
    r = run_submit(stack, url, str(doc), "--wait")
    assert r.returncode == 0, r.stderr
    assert "firstmemopage" in squash(r.stdout) and "secondmemopage" in squash(r.stdout)
    # Not a terminal: plain progress lines on stderr, ending with the final state.
    assert "memo.pdf: succeeded 2/2 pages" in r.stderr


def test_submit_json_to_out_dir(stack, tmp_path):
    url = stack.api()
    stack.worker()
    doc = tmp_path / "note.png"
    doc.write_bytes(text_image(["Written to a folder"]))
    out = tmp_path / "results"
    r = run_submit(stack, url, str(doc), "--wait", "--format", "json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "note.json").read_text())
    assert "writtentoafolder" in squash(result["text"])


def test_submit_exit_codes(stack, tmp_path):
    url = stack.api()
    assert run_submit(stack, url, str(tmp_path / "missing.png")).returncode == 2
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = run_submit(stack, url, str(bad), "--wait")
    assert r.returncode == 1 and "415" in r.stderr
    stack.worker(OCR_ENGINE="null", GNOSIS_NULL_ENGINE_DELAY="5", GNOSIS_PAGE_SOFT_TIMEOUT="1",
                 GNOSIS_PAGE_HARD_TIMEOUT="3")
    slow = tmp_path / "slow.png"
    slow.write_bytes(text_image(["times out"]))
    r = run_submit(stack, url, str(slow), "--wait")
    assert r.returncode == 1 and "timeout" in r.stderr


def test_python_client_is_what_the_cli_uses(stack, tmp_path):
    url = stack.api()
    stack.worker()
    doc = tmp_path / "c.png"
    doc.write_bytes(text_image(["Client library page"]))
    client = Client(url)
    job = client.submit(doc, idempotency_key="c-1")
    seen = []
    final = client.wait(job["id"], timeout=60, on_progress=seen.append)
    assert final["status"] == "succeeded" and seen[-1] == final
    assert "clientlibrarypage" in squash(client.result(job["id"], markdown=True))
    try:
        client.job("0" * 32)
    except ApiError as exc:
        assert exc.status == 404 and exc.code == "not_found"
    else:
        raise AssertionError("expected a 404")


def test_submit_draws_a_progress_bar_on_a_terminal(stack, tmp_path):
    import os
    import pty

    url = stack.api()
    stack.worker()
    doc = tmp_path / "tty.png"
    doc.write_bytes(text_image(["Terminal progress"]))
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gnosis_ocr.cli", "submit", "--url", url, str(doc), "--wait"],
                            cwd=ROOT, env=stack.env, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    out, _ = proc.communicate(timeout=120)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert proc.returncode == 0
    assert b"\r" in screen and b"[" + b"#" * 30 + b"] 1/1 succeeded" in screen, screen
    assert "terminalprogress" in squash(out)


def test_dev_starts_its_own_redis_and_prints_the_sample(tmp_path):
    from harness.stack import free_port

    port = free_port()
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GNOSIS_", "OCR_"))}
    env.update(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "dev", "--port", str(port), "--submit",
                        "samples/letter.png"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "started redis-server" in r.stderr
    # The README's try-it command: the sample's four lines, word for word, spaces included.
    for line in ("GNOSIS OCR SAMPLE LETTER", "Invoice number 4821 dated 12 March 2026",
                 "Total amount due: 1,250.00 EUR", "Thank you for your business."):
        assert line in r.stdout.splitlines(), r.stdout
    # stdout is the result alone (the stack's logs go to stderr), so `> letter.md` is clean.
    assert r.stdout.strip().splitlines()[0] == "GNOSIS OCR SAMPLE LETTER", r.stdout
    assert "GET /" not in r.stdout and "celery" not in r.stdout.lower(), r.stdout
    # The screen shows what the service did, not the stack: where its logs went (first), progress, the
    # result. The banners and access logs are in that file.
    screen = r.stderr.strip().splitlines()
    assert screen[0].startswith("gnosis-ocr dev: the stack's logs go to "), screen
    assert len(screen) <= 8 and "celery" not in r.stderr.lower() and "GET /" not in r.stderr, screen
    log = screen[0].rsplit(" ", 1)[1]
    assert "[tasks]" in open(log).read() and "POST /v1/jobs" in open(log).read()
    os.unlink(log)


def test_dev_without_a_redis_says_so_and_leaves_no_log_file():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GNOSIS_", "OCR_"))}
    env.update(REDIS_URL="redis://redis.invalid:6379/0")  # not this machine's: dev cannot start one
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cli", "dev", "--submit", "samples/letter.png"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nothing answers at redis://redis.invalid:6379/0" in r.stderr, r.stderr
    log = r.stderr.splitlines()[0].rsplit(" ", 1)[1]
    assert not os.path.exists(log), "an empty log file was left behind"


class FlakyFront:
    """A TCP front for the API (a load balancer mid-deploy): it resets its first `drops` connections,
    then passes bytes both ways."""

    def __init__(self, upstream: str, drops: int) -> None:
        import socket
        import threading
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.drops = drops
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import struct
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drops:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                conn.close()
                continue
            up = socket.create_connection(self.upstream)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.sock.close()


def test_submit_wait_rides_out_connection_resets_and_makes_one_job(stack, tmp_path):
    url = stack.api()
    stack.worker()
    front = FlakyFront(url, drops=2)
    try:
        image = tmp_path / "letter.png"
        image.write_bytes(text_image(["through a flaky front"]))
        r = run_submit(stack, front.url, str(image), "--wait", "--format", "markdown")
        assert r.returncode == 0, r.stderr
        assert "flakyfront" in squash(r.stdout)
        assert front.accepted > 2
        jobs = {k for k in stack.redis.scan_iter("gnosis:job:*") if k.count(b":") == 2}
        assert len(jobs) == 1, jobs
    finally:
        front.stop()


def test_the_client_and_the_cli_ask_for_a_signed_webhook(stack, tmp_path):
    """A fire-and-forget submit names where the job is POSTed once final, from Python and from the shell."""
    from gnosis_ocr import webhook
    from harness.stack import wait_until
    from tests.integration.test_webhooks import SECRET, Receiver, hooks_env

    receiver = Receiver()
    try:
        hooks_env(stack)
        url = stack.api()
        stack.worker()
        doc = tmp_path / "hooked.png"
        doc.write_bytes(text_image(["A page with a webhook"]))
        by_client = Client(url).submit(doc, callback_url=receiver.url)
        r = run_submit(stack, url, str(doc), "--callback-url", receiver.url)
        assert r.returncode == 0, r.stderr
        by_cli = json.loads(r.stdout)
        assert by_client["callback_url"] == by_cli["callback_url"] == receiver.url
        wait_until(lambda: len(receiver.calls) >= 2, timeout=60, message="both jobs' webhooks")
        posted = {json.loads(body)["id"]: (headers, body) for headers, body in receiver.calls}
        assert set(posted) == {by_client["id"], by_cli["id"]}
        for headers, body in posted.values():
            assert json.loads(body)["status"] == "succeeded"
            assert webhook.verify(SECRET, headers["X-Gnosis-Signature"], body)
    finally:
        receiver.stop()
