"""Every tunable's default, with its unit. Settings read the environment over these."""

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
"""Broker, job records, page results and the model-download lease all live here."""

DEFAULT_MODEL_CACHE_PATH = "/cache/huggingface"
"""The shared Hugging Face home (a GCS FUSE mount in production); the hub cache is `<this>/hub`."""

DEFAULT_MODEL_ID = "nanonets/Nanonets-OCR-s"
DEFAULT_MODEL_REVISION = "main"
DEFAULT_ENGINE = "nanonets"
ENGINES = ("nanonets", "tesseract", "rapidocr", "null")
"""`null` returns empty text without OCR: for measuring the queue's own overhead."""

DEFAULT_DEVICE = ("auto",)
"""Where the GPU engine runs: `auto` (every visible GPU, else the CPU), `cpu`, `cuda`, `cuda:N`, or a list."""

DEFAULT_THREADS = 0
"""CPU threads per engine; 0: the host's cores shared out among the worker's pool processes."""

DEFAULT_VISION_ATTENTION = "batched"
"""The vision tower's attention: `batched` (one call per layer, and the patch embedding as one GEMM, each kept
on a device only if its start-up check agrees) or `windows` (the library's tower: a call per window)."""

DEFAULT_PREFILL_CONCURRENT = "auto"
"""Where a prefill runs: `on` (a thread, and on a GPU a CUDA stream, of its own, the pages in flight decoding
meanwhile, a full chunk prefilled ahead of the slots it takes; on a device only where a start-up check finds
its forward bit-identical), `off` (on the engine
loop's thread, every page in flight waiting for it), `auto` (`on` on a GPU, `off` on the CPU, whose cores
the decode steps already use)."""

DEFAULT_DECODE_ATTENTION = "flash"
"""A decode step's attention: `flash` (FlashAttention's variable-length kernel, each page reading only its
own keys; on a device only where it runs and a start-up check agrees with `sdpa`) or `sdpa` (every page
reads the step's length bucket, past its own length masked)."""

DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
"""Largest accepted request body, in bytes; bigger uploads get 413 before the body is read."""

DEFAULT_MAX_PAGES = 100
"""Most pages in one document (PDF or multi-frame TIFF)."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Most pixels in one image page, checked from the header before any decoding (pixel bombs)."""

DEFAULT_PAGE_MAX_SIDE = 1280
"""Longest side, in pixels, a page is rendered or scaled to before OCR (the model card's practice)."""

DEFAULT_JOB_TTL = 24 * 3600
"""Seconds a job's record and result are kept once it is final (succeeded, failed, cancelled).
A job that is queued or running never expires."""

DEFAULT_JOB_MAX_AGE = 7 * 24 * 3600
"""Seconds after submission when a job that has still not finished is failed with `expired`
(a backlog no worker ever drains); it is then kept for GNOSIS_JOB_TTL like any final job."""

DEFAULT_MAX_QUEUED_BYTES = 2 * 1024**3
"""Input bytes of all live jobs together; past it submissions get 429. Keep it under Redis's maxmemory."""

DEFAULT_INPUT_CACHE_BYTES = 1024**3
"""Bytes of job inputs a worker host keeps on local disk, so that each document leaves Redis once per
host rather than once per page; 0 turns the copy off."""

DEFAULT_INPUT_CACHE_DIR = ""
"""Where those copies live; empty: a private directory under the system's temporary one."""

DEFAULT_INPUT_STORE = "redis"
"""Where submitted documents wait: `redis`, or an absolute directory every API and worker mounts."""

DEFAULT_REDIS_RETRY = 60.0
"""Seconds a worker keeps retrying to record a finished page through Redis errors (a restart, a
failover, an out-of-memory reply) before it returns the page's message to the queue."""

DEFAULT_PAGE_SOFT_TIMEOUT = 300
"""Seconds one page may run before it is stopped and its job fails with `timeout`."""

PAGE_HARD_TIMEOUT_GRACE = 60
"""Seconds after the soft limit when the page's worker process is killed outright."""

DEFAULT_PAGE_HARD_TIMEOUT = 0
"""Seconds before a page's process is killed; 0: the soft timeout plus PAGE_HARD_TIMEOUT_GRACE."""

DEFAULT_PAGE_MAX_ATTEMPTS = 3
"""Deliveries of one page (crashes and redeliveries included) before its job fails with `worker_lost`."""

DEFAULT_QUEUE = "ocr"
"""Celery queue the pages go to."""

DEFAULT_MAX_NEW_TOKENS = 4096
"""Output tokens the VLM may generate for one page."""

DEFAULT_WAIT_MAX = 30
"""Longest long-poll (`?wait=`) on a job, in seconds."""

DEFAULT_REDIS_TIMEOUT = 5.0
"""Seconds a Redis call may take before the API answers 503 instead of hanging."""

BROKER_HEALTH_CHECK_INTERVAL = 10
"""Seconds between kombu's checks of a worker's long-lived broker connections (its BRPOP and its pub/sub
subscription): one whose path died without a reset (a firewall's or NAT's state dropped, a host gone) is
dropped and made again within about 1 + 2 x this (kombu's default, 25, left such a worker idle 51 s)."""

DEFAULT_ACCEPT_REPLICAS = "0"
"""Redis replicas that must hold a job or batch before the API answers 202 (Redis's WAIT): a number, or
`connected` (every replica connected at that moment; the primary alone while none is); "0": answer
once the primary has it, which a failover in the next moment can lose (docs/operations.md)."""

DEFAULT_ACCEPT_REPLICAS_WAIT = 1.0
"""Seconds a submission waits for GNOSIS_ACCEPT_REPLICAS replicas before it is refused (503
`redis_unreplicated`, nothing kept); shorter than GNOSIS_REDIS_TIMEOUT."""

DEFAULT_RETRY_AFTER = 5
"""Seconds clients are told to wait (Retry-After) when the queue is unreachable or full."""

DEFAULT_LEASE_TTL = 30
"""Seconds the model-download lease lives without a heartbeat; a dead downloader is replaced after this."""

DEFAULT_LEASE_WAIT = 3600
"""Seconds a worker waits for another worker's download before giving up."""

DEFAULT_DOWNLOAD_WORKERS = 8
"""Files fetched in parallel by the one downloader."""

DEFAULT_DOWNLOAD_STALL_TIMEOUT = 300
"""Seconds a download may go without a byte written or a file finished before it is killed and started
again (a transfer that hangs without an error, as Xet's are known to on some hosts)."""

DEFAULT_CACHE_VISIBILITY_WAIT = 30
"""Seconds a worker waits for a manifest published on another host to appear here (GCS FUSE stat cache)."""

DEFAULT_HEARTBEAT_INTERVAL = 5.0
"""Seconds between worker heartbeats; a worker silent for three intervals is dead and its pages requeued."""

DEFAULT_MAX_QUEUE_DEPTH = 10_000
"""Most tasks (one page each by default) waiting in the queue; beyond it submissions get 429."""

DEFAULT_NULL_ENGINE_DELAY = 0.0
"""Seconds the `null` engine spends on each page: simulated work for load tests and fault drills."""

DEFAULT_IDEMPOTENCY_WAIT = 5.0
"""Seconds a repeated Idempotency-Key request waits for the first one's job record to appear."""

DEFAULT_WEBHOOK_MAX_ATTEMPTS = 6
"""Deliveries of a job's final-state webhook before giving up (network errors, 5xx, 408, 429)."""

DEFAULT_WEBHOOK_BACKOFF = 2.0
"""Seconds before the first webhook retry; doubled after each failed attempt."""

DEFAULT_WEBHOOK_TIMEOUT = 10.0
"""Seconds one webhook POST may take."""

DEFAULT_BATCH_SIZE = 0
"""Pages a GPU engine decodes at once, per device; 0 sizes it from free GPU memory (at most 128)."""

DEFAULT_PREFILL_BATCH = 4
"""Waiting pages of equal prompt length prefilled together in one forward pass."""

DEFAULT_PREFILL_GATHER_MS = 250
"""Milliseconds freed batch slots may stay empty, while pages queue for them, waiting for a full prefill
chunk (OCR_PREFILL_BATCH pages) instead of prefilling each page as its slot frees; 0 refills at once.
A prefill costs the host about the same for one page as for four, and stalls the whole batch while it
runs (`bench/engine_host.py --chunk-ms`, docs/benchmarks.md). Only where prefills run on the engine loop's
thread: beside the steps (OCR_PREFILL_CONCURRENT), full chunks are prefilled ahead of free slots instead."""

DEFAULT_REPETITION_WINDOW = 512
"""Output tokens, at least, that one repeated unit must fill before the repetition guard stops a page
(and marks it truncated); 0 turns the guard off. See REPETITION_MIN_REPEATS."""

REPETITION_MIN_REPEATS = 100
"""Times in a row one unit (a row, a word, a blank line) must repeat before the guard calls it a loop:
more lines than a page holds (an A4 page at 8 pt has about 90), so empty forms, checkbox grids, tables
of zeros and dotted leaders are never cut."""

ENGINE_STALL_GRACE = 60.0
"""Seconds past a page's deadline that a batched engine may take to answer before the page's thread
declares the engine's loop stuck, marks the engine dead and returns the page to the queue."""

ENGINE_LOOP_ANSWER = 2.0
"""Seconds a page's thread that found a batched engine stuck gives the engine's loop to end the engine
itself, charging only a prefill that hangs on the prefill thread (engines/ending.py `stalled`); past
them the loop is stuck too, and the page's thread ends the engine. Also how recently the loop must have
turned to count as turning: a turn is one decode step, or one prefill chunk on its own thread."""

DEFAULT_LOOP_STALL_TIMEOUT = 120.0
"""Seconds a worker's event loop (where Celery takes and acknowledges messages) may go without turning
while Redis answers before the worker exits for its supervisor to replace it (worker/loopwatch.py); 0
turns the watch off. Longer than Celery's reconnection backoff (at most 30 s between tries)."""

CANCEL_CHECK_INTERVAL = 1.0
"""Seconds between a worker's reads of whether the jobs of its pages in flight were cancelled, failed
or deleted (one read for all of them, worker/watch.py): how long such a page may decode on."""

ENGINE_EXIT_GRACE = 30.0
"""Seconds a worker whose engine died waits for its pages to go back to the queue (a warm shutdown)
before it exits regardless."""

ENGINE_SUSPECT_SHARE = 8
"""A page that was on a device when its engine died (a suspect: the page that caused it is among them)
shares a device with at most 1 in this many of its slots' worth of suspects (16 of 128), fresh pages
filling the rest: a page that kills the engine again takes few suspects with it."""

ENGINE_DEATHS_ALONE = 2
"""Engine deaths a page was on the device for, after which it runs alone on its device; if the engine
dies then too, the page fails (`engine_error`) instead of going back to the queue."""

WRITE_WAIT_MAX = 5.0
"""Longest pause, in seconds, between a worker's tries of a write Redis refuses (worker/refusals.py: the
start-up probe, taking and requeueing messages; the pause doubles from a tenth of a second)."""

DEFAULT_PREFETCH_PAGES = 4
"""Pages a batched worker holds beyond its batch, prepared and waiting, so a freed slot refills at once."""

DEFAULT_API_CONNECTIONS = 1000
"""Open connections each API process serves at once (each a gevent greenlet: idle ones cost a few KiB)."""

DEFAULT_API_WORKER_CLASS = "gevent"
"""gunicorn's worker class for the API: `gevent` or `gthread`."""

DEFAULT_CACHE_VERIFY = "quick"
"""How a worker checks the cached model before loading it: `quick` (sizes and mtimes) or `full` (hashes)."""

DEFAULT_WORKER_PORT = 0
"""The worker's probe port (/healthz, /readyz, /metrics); 0: none."""

DEFAULT_HEADER_TIMEOUT = 10
"""Seconds a client has to send a complete request head (and to send the next one on a kept-alive
connection) before the API drops it: slow-header clients cannot pile up."""

DEFAULT_MAX_KEY_PAGES = 2500
"""With API keys on: pages one key may have waiting or running; past it that key (only) gets 429."""

DEFAULT_REDIS_MEMORY_LIMIT = 0.8
"""Fraction of Redis's maxmemory past which new submissions are refused (503 + Retry-After), so that
accepted jobs' records, results and acknowledgements always fit."""

DEFAULT_RECONCILE_GRACE = 120.0
"""Seconds a live job must be old before the housekeeper looks for its pages that no message will run
(lost between the queue and a worker, or never published) and publishes them again."""

PDF_RENDERERS = 4
"""Renderer processes of a batched (threads pool) worker: PDF pages render in them, each with the page's
deadline, instead of under one process-wide pdfium lock with none."""

DEFAULT_MAX_BATCH_DOCUMENTS = 10_000
"""Documents one batch may hold (GNOSIS_MAX_BATCH_DOCUMENTS); past it, the rest are counted as skipped."""

DEFAULT_WEBHOOK_SECRET = ""
"""The HMAC key webhooks are signed with; empty: unsigned."""

DEFAULT_WEBHOOK_ALLOW_PRIVATE = False
"""Whether callback URLs may resolve to private, loopback or link-local addresses."""

DEFAULT_LISTING_THREADS = 8
"""Documents one batch listing inspects at once (is its result there, what is it, how many pages): each
costs a few bucket round trips, tens of milliseconds apiece, so one at a time a listing makes a few
jobs a second, fewer than a few GPUs consume."""

DEFAULT_BUCKET_TIMEOUT = 60.0
"""Seconds one bucket call of a batch (a listing page, a read, a result write) may take, the storage
client's own retries included, before it counts as failing for now: the listing or page goes back to
the queue, the result write is tried again by the housekeeper."""

DEFAULT_BATCH_BUCKETS = ()
"""`gs://bucket/prefix` entries batches may read and write; none: batches are off."""

DEFAULT_METRICS_OPEN = True
"""Whether /metrics answers without an API key when keys are on."""
