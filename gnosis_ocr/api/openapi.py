"""The OpenAPI 3 description of the HTTP API, built in code so it cannot drift from a copy."""

from __future__ import annotations


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_UNCONFIRMED = _error("Queue unreachable, or (under GNOSIS_ACCEPT_REPLICAS) the change is on the primary and no "
                      "replica confirmed it yet: send it again, repeating it is safe (redis_unreplicated).")


def spec() -> dict:
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    job = {"description": "The job.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}
    by_id = {"job_id": "$response.body#/id"}
    batch_id = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
    batch = {"description": "The batch.", "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Batch"}}}}
    idempotency_key = {"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                                  "pattern": "^[^\\x00-\\x1f\\x7f]+$"}}
    accepted = {**job, "links": {
        "GetJob": {"operationId": "getJob", "parameters": by_id},
        "GetResult": {"operationId": "getResult", "parameters": by_id},
        "CancelJob": {"operationId": "cancelJob", "parameters": by_id},
        "DeleteJob": {"operationId": "deleteJob", "parameters": by_id}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "gnosis-ocr", "version": "1", "description": "Asynchronous OCR: submit, poll, fetch."},
        "paths": {
            "/v1/jobs": {"post": {
                "operationId": "submitJob", "summary": "Submit a document",
                "parameters": [idempotency_key],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"},
                                   "callback_url": {"type": "string", "format": "uri", "maxLength": 2048},
                                   "pages": {"type": "string", "description": "Only these pages, counted from 1: "
                                             "pages and ranges, e.g. \"1-3,7\"."},
                                   "language": {"type": "string", "description": "The CPU engine's languages: "
                                                "Tesseract's codes joined by '+', e.g. \"deu+eng\"."}}}}}},
                "responses": {"202": accepted, "200": job,
                              "400": _error("No file, a bad header or option (invalid_parameter), or a language "
                                            "no worker has (unsupported_language)."),
                              "401": _error("No valid key."),
                              "409": _error("Idempotency key reused with another document."),
                              "413": _error("Too large."), "415": _error("Not a supported document."),
                              "422": _error("Unreadable document, or a page it lacks (page_out_of_range)."),
                              "429": _error("Queue full."),
                              "503": _error("Queue unreachable.")}}},
            "/v1/jobs/{job_id}": {
                "get": {"operationId": "getJob", "summary": "A job's state (long-poll with ?wait=)",
                        "parameters": [job_id, {"name": "wait", "in": "query", "required": False,
                                                "schema": {"type": "number", "minimum": 0, "maximum": 30}}],
                        "responses": {"200": job, "400": _error("Bad wait."), "401": _error("No valid key."),
                                      "404": _error("Unknown job."), "503": _error("Queue unreachable.")}},
                "delete": {"operationId": "deleteJob", "summary": "Cancel if needed and delete everything",
                           "parameters": [job_id],
                           "responses": {"204": {"description": "Deleted."}, "401": _error("No valid key."),
                                         "404": _error("Unknown job."), "503": _UNCONFIRMED}}},
            "/v1/jobs/{job_id}/result": {"get": {
                "operationId": "getResult", "summary": "The result of a succeeded job",
                "parameters": [job_id, {"name": "format", "in": "query", "required": False,
                                        "schema": {"type": "string", "enum": ["json", "markdown"]}}],
                "responses": {"200": {"description": "The result.", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
                    "text/markdown": {"schema": {"type": "string"}}}},
                    "400": _error("Bad format."), "401": _error("No valid key."), "404": _error("Unknown job."),
                    "409": _error("Not ready, failed or cancelled."), "503": _error("Queue unreachable.")}}},
            "/v1/jobs/{job_id}/cancel": {"post": {
                "operationId": "cancelJob", "summary": "Cancel a queued or running job", "parameters": [job_id],
                "responses": {"200": job, "401": _error("No valid key."), "404": _error("Unknown job."),
                              "503": _UNCONFIRMED}}},
            "/v1/batches": {"post": {
                "operationId": "submitBatch", "summary": "Read every document under a gs:// prefix into another",
                "parameters": [idempotency_key],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["source", "destination"], "properties": {
                        "source": {"type": "string"}, "destination": {"type": "string"},
                        "callback_url": {"type": "string"}, "pages": {"type": "string"},
                        "language": {"type": "string"}, "overwrite": {"type": "boolean"}}}}}},
                "responses": {"202": batch, "200": batch, "400": _error("A bad URI or option."),
                              "401": _error("No valid key."),
                              "409": _error("Idempotency key reused with another request."),
                              "403": _error("Batches are off (batches_disabled), or a prefix is outside "
                                            "GNOSIS_BATCH_BUCKETS (forbidden_source)."),
                              "503": _error("Queue unreachable.")}}},
            "/v1/batches/{batch_id}": {"get": {
                "operationId": "getBatch", "summary": "A batch's state", "parameters": [batch_id],
                "responses": {"200": batch, "401": _error("No valid key."), "404": _error("Unknown batch."),
                              "503": _error("Queue unreachable.")}}},
            "/v1/batches/{batch_id}/documents": {"get": {
                "operationId": "getBatchDocuments", "summary": "The batch's failed documents, a page at a time",
                "parameters": [batch_id, {"name": "status", "in": "query", "required": False,
                                          "schema": {"type": "string", "enum": ["failed"]}},
                               {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "Failed documents and the next page.", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "documents": {"type": "array", "items": {"type": "object", "properties": {
                            "name": {"type": "string"}, "code": {"type": "string"},
                            "message": {"type": "string"}}}},
                        "next": {"type": "string", "nullable": True}}}}}},
                              "400": _error("A bad status or cursor."), "401": _error("No valid key."),
                              "404": _error("Unknown batch."), "503": _error("Queue unreachable.")}}},
            "/v1/batches/{batch_id}/cancel": {"post": {
                "operationId": "cancelBatch", "summary": "Stop a batch and its jobs", "parameters": [batch_id],
                "responses": {"200": batch, "401": _error("No valid key."), "404": _error("Unknown batch."),
                              "503": _UNCONFIRMED}}},
            "/v1/cache": {"get": {"summary": "The shared model cache", "responses": {
                "200": {"description": "Cache state.", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Cache"}}}},
                "401": _error("No valid key."), "503": _error("Redis unreachable.")}}},
            "/v1/cache/warm": {"post": {"summary": "Start the one download if absent", "responses": {
                "200": {"description": "Already ready.", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Cache"}}}},
                "202": {"description": "Download started or in progress.", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Cache"}}}},
                "401": _error("No valid key."), "503": _error("Redis unreachable.")}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"summary": "Readiness (Redis answers)", "responses": {
                "200": {"description": "Ready; `redis` gives its memory use, limit and eviction policy, with a "
                        "`warning` when the policy may evict.",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "503": _error("Redis unreachable.")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": _error("No valid key.")}}},
            "/openapi.json": {"get": {"summary": "This description", "responses": {"200": {
                "description": "OpenAPI 3.", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": _schemas()},
    }


def _schemas() -> dict:
    nullable_str = {"type": "string", "nullable": True}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
        "Job": {"type": "object",
                "required": ["id", "status", "created_at", "started_at", "finished_at", "pages_total", "pages_done",
                             "error", "links"],
                "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {**nullable_str, "format": "date-time"},
                    "finished_at": {**nullable_str, "format": "date-time"},
                    "pages_total": {"type": "integer"}, "pages_done": {"type": "integer"},
                    "attempts": {"type": "integer"}, "filename": nullable_str, "callback_url": nullable_str,
                    "error": {"type": "object", "nullable": True, "properties": {
                        "code": {"type": "string"}, "message": {"type": "string"}}},
                    "links": {"type": "object", "properties": {"self": {"type": "string"},
                                                               "result": {"type": "string"}}}}},
        "Result": {"type": "object", "required": ["id", "model", "pages", "text"], "properties": {
            "id": {"type": "string"},
            "model": {"type": "object", "properties": {"id": nullable_str, "revision": nullable_str}},
            "options": {"type": "object", "description": "The options the job was submitted with.",
                        "properties": {"pages": nullable_str, "language": nullable_str}},
            "pages": {"type": "array", "items": {"type": "object", "required": ["page", "text", "truncated"],
                                                 "properties": {
                "page": {"type": "integer"}, "text": {"type": "string"},
                "truncated": {"type": "boolean", "description": "The page's output was cut short: it hit the "
                              "token cap (OCR_MAX_NEW_TOKENS) or the repetition guard stopped it."}}}},
            "text": {"type": "string"}}},
        "Batch": {"type": "object", "required": ["id", "status", "documents_total", "documents_done",
                                                 "documents_failed", "documents_skipped", "created_at",
                                                 "finished_at", "links"], "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "source": {"type": "string"}, "destination": {"type": "string"},
            "documents_total": {"type": "integer"}, "documents_done": {"type": "integer"},
            "documents_failed": {"type": "integer"}, "documents_skipped": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "finished_at": {**nullable_str, "format": "date-time"},
            "error": {"type": "object", "nullable": True, "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}},
            "links": {"type": "object", "properties": {"self": {"type": "string"},
                                                       "documents": {"type": "string"}}}}},
        "Cache": {"type": "object", "required": ["model_id", "revision", "state"], "properties": {
            "model_id": {"type": "string"}, "revision": {"type": "string"},
            "resolved_revision": nullable_str,
            "state": {"type": "string", "enum": ["absent", "downloading", "ready", "corrupt"]},
            "files": {"type": "integer"}, "bytes": {"type": "integer"},
            "last_verified": nullable_str}},
    }
