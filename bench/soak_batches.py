"""The soak's batches (`python -m bench.soak --batch-every S`): a batch of one-page images from a GCS
emulator's bucket to another prefix every S seconds, each of which must end with every document counted
once and a result object for each document done."""

from __future__ import annotations

import os
import time

import requests

from harness.docs import text_image


class Batches:
    """Mixed into `Soak`: it owns `args`, `stack`, `refused`, `stop`, `batches`, `bucket` and `batch_key`."""

    def start_bucket(self) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        from harness.gcsemulator import start_emulator

        self.emulator = start_emulator()
        client = storage.Client(project="soak", credentials=AnonymousCredentials())
        self.bucket = client.create_bucket("soak")
        self.stack.env.update(STORAGE_EMULATOR_HOST=os.environ["STORAGE_EMULATOR_HOST"], GOOGLE_CLOUD_PROJECT="soak",
                              GNOSIS_BATCH_BUCKETS="gs://soak/")

    def batch_auth(self) -> dict:
        return {"Authorization": f"Bearer {self.batch_key}"} if self.batch_key else {}

    def batch_loop(self, url: str) -> None:
        n = 0
        while not self.stop.wait(self.args.batch_every):
            prefix = f"in/b{n:03}/"
            for d in range(self.args.batch_documents):
                self.bucket.blob(f"{prefix}d{d:02}.png").upload_from_string(text_image([f"Soak batch {n} doc {d}"]))
            try:
                r = requests.post(f"{url}/v1/batches", json={"source": f"gs://soak/{prefix}",
                                                              "destination": f"gs://soak/out/b{n:03}/"},
                                  headers=self.batch_auth(), timeout=15)
                if r.status_code == 202:
                    self.batches[r.json()["id"]] = f"out/b{n:03}/"
                else:
                    self.refused[str(r.status_code) if r.status_code in (429, 503) else "other"] += 1
            except requests.RequestException:
                self.refused["other"] += 1
            n += 1

    def tally_batches(self, url: str, deadline: float) -> dict:
        finals: dict[str, dict] = {}
        while len(finals) < len(self.batches) and time.monotonic() < deadline:
            for batch_id in self.batches:
                if batch_id in finals:
                    continue
                r = requests.get(f"{url}/v1/batches/{batch_id}", headers=self.batch_auth(), timeout=15)
                if r.status_code != 200:
                    finals[batch_id] = {"status": "lost"}
                elif r.json()["status"] in ("succeeded", "failed", "cancelled"):
                    finals[batch_id] = r.json()
            time.sleep(2)  # polling batches, which have no long-poll
        miscounted = results_missing = 0
        for batch_id, batch in finals.items():
            if batch["status"] == "lost":
                continue
            counted = batch["documents_done"] + batch["documents_failed"] + batch["documents_skipped"]
            miscounted += counted != batch["documents_total"] or batch["documents_total"] != self.args.batch_documents
            names = {b.name for b in self.bucket.list_blobs(prefix=self.batches[batch_id]) if b.name.endswith(".json")
                     and not b.name.endswith("_gnosis_batch.json")}
            results_missing += max(batch["documents_done"] - len(names), 0)
        statuses: dict[str, int] = {}
        for batch in finals.values():
            statuses[batch["status"]] = statuses.get(batch["status"], 0) + 1
        return {"batches": len(self.batches), "batch_statuses": statuses,
                "batches_not_final": len(self.batches) - len(finals),
                "batches_miscounted": miscounted, "batch_results_missing": results_missing}
