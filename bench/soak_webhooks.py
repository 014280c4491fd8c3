"""The soak's webhooks (`python -m bench.soak --webhooks`): every job is submitted with a `callback_url` on a
receiver in the soak's own process, which answers every tenth POST 503 (retried by the worker). At the end,
each job that reached a final state and was not deleted must have been POSTed at least once, signed, with
that final state; a delivery seen more than once (at least once is the promise) is counted, not failed."""

from __future__ import annotations

import json
import time

SECRET = "whsec-soak"


class Webhooks:
    """Mixed into `Soak`: it owns `args` and `stack`."""

    receiver = None  # harness.webhooks.Receiver
    callback_url: str | None = None

    def start_webhooks(self) -> None:
        from harness.webhooks import Receiver

        self.receiver = Receiver(refuse_every=10)
        self.callback_url = self.receiver.url
        self.stack.env.update(GNOSIS_WEBHOOK_SECRET=SECRET, GNOSIS_WEBHOOK_ALLOW_PRIVATE="true",
                              GNOSIS_WEBHOOK_BACKOFF="0.5")

    def hooks(self) -> list[tuple[str, str, str, bool]]:
        """(delivery id, job id, status, signature good) of every POST the receiver took."""
        from gnosis_ocr import webhook

        out = []
        for headers, body in self.receiver.accepted():
            job = json.loads(body)
            out.append((headers["X-Gnosis-Delivery"], job["id"], job["status"],
                        webhook.verify(SECRET, headers["X-Gnosis-Signature"], body)))
        return out

    def tally_webhooks(self, finals: dict[str, dict], deleted: set[str], deadline: float) -> dict:
        """Wait (until `deadline`) for a webhook of every final, undeleted job; count what is missing or wrong."""
        owed = {job_id: job["status"] for job_id, job in finals.items()
                if job["status"] in ("succeeded", "failed", "cancelled") and job_id not in deleted}
        while time.monotonic() < deadline and not owed.keys() <= {job_id for _, job_id, _, _ in self.hooks()}:
            time.sleep(1)  # polling the receiver while the last deliveries are retried
        hooks = self.hooks()
        last = {job_id: status for _, job_id, status, _ in hooks}
        deliveries = [delivery for delivery, _, _, _ in hooks]
        return {"webhooks_owed": len(owed), "webhooks_missing": len(owed.keys() - last.keys()),
                "webhooks_wrong_status": sum(last[j] != s for j, s in owed.items() if j in last),
                "webhooks_badly_signed": sum(not ok for _, _, _, ok in hooks),
                "webhook_deliveries_repeated": len(deliveries) - len(set(deliveries)),
                "webhook_posts_refused": len(self.receiver.refused)}

    def stop_webhooks(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
