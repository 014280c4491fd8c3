"""The soak's webhooks (`python -m bench.soak --webhooks`): every job is submitted with a `callback_url` on a
receiver in the soak's own process, which answers every tenth POST 503 (retried by the worker). At the end,
each job that reached a final state and was not deleted must have been POSTed at least once, signed, with
that final state; a delivery seen more than once (at least once is the promise) is counted, not failed."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "whsec-soak"


class Webhooks:
    """Mixed into `Soak`: it owns `args` and `stack`."""

    receiver: ThreadingHTTPServer | None = None
    callback_url: str | None = None

    def start_webhooks(self) -> None:
        self.hooks: list[tuple[str, str, str, bool]] = []  # (delivery id, job id, status, signature ok)
        self.hook_posts = 0
        lock = threading.Lock()
        soak = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                from gnosis_ocr import webhook

                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    soak.hook_posts += 1
                    refused = soak.hook_posts % 10 == 0
                    if not refused:
                        job = json.loads(body)
                        soak.hooks.append((self.headers["X-Gnosis-Delivery"], job["id"], job["status"],
                                           webhook.verify(SECRET, self.headers["X-Gnosis-Signature"], body)))
                self.send_response(503 if refused else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.receiver.serve_forever, daemon=True).start()
        self.callback_url = f"http://127.0.0.1:{self.receiver.server_address[1]}/hook"
        self.stack.env.update(GNOSIS_WEBHOOK_SECRET=SECRET, GNOSIS_WEBHOOK_ALLOW_PRIVATE="true",
                              GNOSIS_WEBHOOK_BACKOFF="0.5")

    def tally_webhooks(self, finals: dict[str, dict], deleted: set[str], deadline: float) -> dict:
        """Wait (until `deadline`) for a webhook of every final, undeleted job; count what is missing or wrong."""
        owed = {job_id: job["status"] for job_id, job in finals.items()
                if job["status"] in ("succeeded", "failed", "cancelled") and job_id not in deleted}
        while time.monotonic() < deadline and not owed.keys() <= {job_id for _, job_id, _, _ in self.hooks}:
            time.sleep(1)  # polling the receiver while the last deliveries are retried
        last: dict[str, str] = {}
        for _, job_id, status, _ in self.hooks:
            last[job_id] = status
        deliveries = [delivery for delivery, _, _, _ in self.hooks]
        return {"webhooks_owed": len(owed), "webhooks_missing": len(owed.keys() - last.keys()),
                "webhooks_wrong_status": sum(last[j] != s for j, s in owed.items() if j in last),
                "webhooks_badly_signed": sum(not ok for _, _, _, ok in self.hooks),
                "webhook_deliveries_repeated": len(deliveries) - len(set(deliveries)),
                "webhook_posts_refused": self.hook_posts // 10}

    def stop_webhooks(self) -> None:
        if self.receiver is not None:
            self.receiver.shutdown()
            self.receiver.server_close()
