"""A local stand-in for the Hugging Face Hub's HTTP API, serving one model repo from a folder.

It answers the routes huggingface_hub uses (model info, HEAD/GET resolve), counts
every request, and can throttle its transfer rate so a download can be killed
half-way. Point HF_ENDPOINT at `.url`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")

TINY_REPO = "test-org/tiny-ocr"
"""The repo id the stand-in hub serves the tiny model under."""


class HubStub:
    def __init__(self, repo_id: str, folder: str | Path, *, rate: float | None = None,
                 stall_after: int | None = None) -> None:
        self.repo_id = repo_id
        self.folder = Path(folder)
        self.rate = rate  # bytes per second for GET bodies; None = unthrottled
        # A transfer that hangs without an error: after this many bytes of a file, nothing more is sent
        # and the connection stays open until the stub stops.
        self.stall_after = stall_after
        self._stopping = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.file_gets: Counter[str] = Counter()
        self.bytes_served = 0
        self.files = self._index()
        self.sha = hashlib.sha1("".join(sorted(f["sha256"] for f in self.files.values())).encode()).hexdigest()
        self._server: ThreadingHTTPServer | None = None

    def _index(self) -> dict[str, dict]:
        files = {}
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            name = path.relative_to(self.folder).as_posix()
            files[name] = {
                "path": path,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "blob_id": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                "lfs": name.endswith(LFS_SUFFIXES),
            }
        return files

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def model_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.file_gets.clear()
            self.bytes_served = 0

    def start(self) -> HubStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                stub._handle(self, head=True)

            def do_GET(self) -> None:
                stub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        with self.lock:
            self.requests.append((h.command, path))
        repo = re.escape(self.repo_id)
        if m := re.fullmatch(rf"/api/models/{repo}(?:/revision/([^/]+))?", path):
            return self._json(h, self._model_info())
        if m := re.fullmatch(rf"/{repo}/resolve/([^/]+)/(.+)", path):
            return self._file(h, m.group(2), head=head)
        self._json(h, {"error": "Repository Not Found"}, status=404)

    def _model_info(self) -> dict:
        siblings = []
        for name, f in self.files.items():
            entry = {"rfilename": name, "size": f["size"], "blobId": f["blob_id"]}
            if f["lfs"]:
                entry["lfs"] = {"sha256": f["sha256"], "size": f["size"], "pointerSize": 134}
            siblings.append(entry)
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.sha, "private": False,
                "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}

    def _json(self, h: BaseHTTPRequestHandler, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status == 404:
            h.send_header("X-Error-Code", "RepoNotFound")
        h.end_headers()
        h.wfile.write(data)

    def _file(self, h: BaseHTTPRequestHandler, name: str, *, head: bool) -> None:
        f = self.files.get(name)
        if f is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Repo-Commit", self.sha)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("X-Repo-Commit", self.sha)
        h.send_header("Content-Length", str(f["size"]))
        h.send_header("Content-Type", "application/octet-stream")
        if f["lfs"]:
            h.send_header("X-Linked-Etag", f'"{f["sha256"]}"')
            h.send_header("X-Linked-Size", str(f["size"]))
            h.send_header("ETag", f'"{f["sha256"]}"')
        else:
            h.send_header("ETag", f'"{f["blob_id"]}"')
        h.end_headers()
        if head:
            return
        with self.lock:
            self.file_gets[name] += 1
        data = f["path"].read_bytes()
        chunk = 64 * 1024
        started = time.monotonic()
        sent = 0
        try:
            for i in range(0, len(data), chunk):
                if self.stall_after is not None and sent >= self.stall_after:
                    h.wfile.flush()
                    self._stopping.wait()
                    return
                h.wfile.write(data[i:i + chunk])
                sent += len(data[i:i + chunk])
                with self.lock:
                    self.bytes_served += len(data[i:i + chunk])
                if self.rate:
                    ahead = sent / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)  # throttling the link is the point here
        except (BrokenPipeError, ConnectionResetError):
            pass


def main() -> None:
    """Run standalone (benchmarks): python -m tests.hubstub REPO_ID FOLDER [RATE]."""
    import sys

    stub = HubStub(sys.argv[1], sys.argv[2], rate=float(sys.argv[3]) if len(sys.argv) > 3 else None).start()
    print(stub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
