"""The job store's Lua scripts: every state change of a job is one of these, atomic in Redis.

Every script but OVERDUE is called with the same keys (`JobStore._keys`), named at its top, and
with the two halves of the owner's pending-pages key (keys.OWNER_PAGES) as its first two arguments:
the owner is read from the record, so that key is built inside (one Redis, not a cluster). What a
script returns is one of the enums in job.py.

A live job has no expiry: its retention clock (GNOSIS_JOB_TTL) starts when it becomes final, in
`close` below. Times that decide anything come from Redis's own clock (TIME), never a host's.
"""

# KEYS of every job script, in order; page scripts add the claiming worker's in-flight hash.
_KEYS = """
local record, input, pages, attempts, events, live, queued_bytes, outbox, batch_ends, owners = unpack(KEYS, 1, 10)
local inflight = KEYS[11]
local owner_prefix, owner_suffix = ARGV[1], ARGV[2]
"""

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

_FINAL = """
local st = redis.call('HGET', record, 'status')
local final = (st == 'succeeded' or st == 'failed' or st == 'cancelled')
"""

_OWNER = """
local function owner_pages_key()
  return owner_prefix .. (redis.call('HGET', record, 'owner') or '') .. owner_suffix
end
-- What a live job counts against the queue bounds: its input bytes, and its owner's pages not yet done.
local function uncount()
  if redis.call('HGET', record, 'counted') ~= '1' then return end
  redis.call('DECRBY', queued_bytes, tonumber(redis.call('HGET', record, 'input_bytes') or '0'))
  local left = tonumber(redis.call('HGET', record, 'pages_total') or '0') -
               tonumber(redis.call('HGET', record, 'pages_done') or '0')
  redis.call('DECRBY', owner_pages_key(), left)
  redis.call('HSET', record, 'counted', '0')
end
"""

# Moves a live job to its final state: frees its input (and what it counted against the bounds),
# starts the retention clock on what stays, takes it off the live index and wakes long-polls.
_CLOSE = _OWNER + """
local function close(status, now, ttl, code, message)
  redis.call('HSET', record, 'status', status, 'finished_at', now)
  if code ~= '' then redis.call('HSET', record, 'error_code', code, 'error_message', message) end
  redis.call('DEL', input)
  uncount()
  for _, key in ipairs({record, pages, attempts}) do redis.call('EXPIRE', key, ttl) end
  local idem = redis.call('HGET', record, 'idem_key')
  if idem and idem ~= '' then redis.call('EXPIRE', idem, ttl) end
  local id = redis.call('HGET', record, 'id')
  redis.call('ZREM', live, id)
  -- The webhook is owed from this very transition: in the outbox (scored by when it is due) until a
  -- delivery settles it, so a crash between this commit and the publish loses none.
  local callback = redis.call('HGET', record, 'callback_url')
  if callback and callback ~= '' then
    redis.call('ZADD', outbox, 'NX', tonumber(redis.call('TIME')[1]), id)
  end
  -- A batch's document is owed its result and its count the same way.
  local batch = redis.call('HGET', record, 'batch')
  if batch and batch ~= '' then
    redis.call('ZADD', batch_ends, 'NX', tonumber(redis.call('TIME')[1]), id)
  end
  redis.call('PUBLISH', events, status)
end
"""

# Returns the creation time in ms (Redis's clock), or -1, writing nothing, when the key no longer
# holds this request's claim (a retry took it over while this request was slow): one key, one job.
CREATE = _KEYS + _NOW_MS + """
-- input bytes ('' when stored elsewhere), their size, idempotency key or '', pages, owner, the claim
-- this request holds on the key; then the record's field/value pairs from ARGV[10] on.
local id, data, size, idem, npages, owner, claim = unpack(ARGV, 3, 9)
if idem ~= '' and redis.call('GET', idem) ~= claim then return -1 end
local created = now_ms()
redis.call('HSET', record, 'created_ms', created, 'input_bytes', size, 'counted', '1', unpack(ARGV, 10))
if data ~= '' then redis.call('SET', input, data) end
redis.call('ZADD', live, created, id)
redis.call('INCRBY', queued_bytes, tonumber(size))
redis.call('INCRBY', owner_prefix .. owner .. owner_suffix, tonumber(npages))
redis.call('SADD', owners, owner)  -- whose backlog /metrics reports
-- The key was claimed with an expiry before the job existed; from now on it lives as long as the job.
if idem ~= '' then redis.call('PERSIST', idem) end
return created
"""

# Returns {verdict} or {'run', input or false, kind, options or false, engine deaths} (job.Verdict); on
# 'run' the page is in the worker's in-flight hash. The token is one execution of the page's task: the
# same call again (a client retrying after a lost reply) counts no second attempt and gets the answer the
# first got.
START_PAGE = _KEYS + _FINAL + _CLOSE + """
local page, now, max_attempts, field, value, want_input, ttl, token = unpack(ARGV, 3, 10)
token = token or ''
if token ~= '' and redis.call('HGET', attempts, 'x:' .. page) == token then
  redis.call('HDEL', inflight, field)
  return {'exhausted'}
end
if not st or final or redis.call('HEXISTS', pages, page) == 1 then
  redis.call('HDEL', inflight, field)
  if not st then return {'gone'} end
  if final then return {'final'} end
  return {'done'}
end
local n
if token ~= '' and redis.call('HGET', attempts, 'k:' .. page) == token then
  n = tonumber(redis.call('HGET', attempts, page) or '1')
else
  n = redis.call('HINCRBY', attempts, page, 1)
  redis.call('HINCRBY', record, 'attempts', 1)
  if token ~= '' then redis.call('HSET', attempts, 'k:' .. page, token) end
end
if n > tonumber(max_attempts) then
  redis.call('HDEL', inflight, field)
  if token ~= '' then redis.call('HSET', attempts, 'x:' .. page, token) end
  close('failed', now, ttl, 'worker_lost', 'Page ' .. (tonumber(page) + 1) .. ' was delivered ' ..
    (n - 1) .. ' times and its worker never finished it; the job was stopped.')
  return {'exhausted'}
end
if st == 'queued' then
  redis.call('HSET', record, 'status', 'running', 'started_at', now)
  redis.call('PUBLISH', events, 'running')
end
redis.call('HSET', inflight, field, value)
local data = false
if want_input == '1' then data = redis.call('GET', input) end
return {'run', data, redis.call('HGET', record, 'kind'), redis.call('HGET', record, 'options'),
  tonumber(redis.call('HGET', attempts, 'd:' .. page) or '0')}
"""

# Hands back a claimed page that did not run (its batch's bucket failed for now, or its engine died): the
# attempt its claim counted is returned and the worker's in-flight entry goes, so a bucket that fails for
# longer than GNOSIS_PAGE_MAX_ATTEMPTS deliveries fails no page `worker_lost`. With `death` '1' the page was
# on the device when its engine died, which is counted instead (admission.py). Returns 1 if an attempt was
# returned; the same call again returns none.
RELEASE_PAGE = _KEYS + """
local page, field, token, death = unpack(ARGV, 3, 6)
redis.call('HDEL', inflight, field)
if token == '' or redis.call('EXISTS', record) == 0 then return 0 end
if redis.call('HGET', attempts, 'k:' .. page) ~= token then return 0 end
redis.call('HDEL', attempts, 'k:' .. page)
if tonumber(redis.call('HGET', attempts, page) or '0') > 0 then
  redis.call('HINCRBY', attempts, page, -1)
  redis.call('HINCRBY', record, 'attempts', -1)
end
if death == '1' then redis.call('HINCRBY', attempts, 'd:' .. page, 1) end
return 1
"""

# Returns {outcome, pages done, pages total} (job.Recorded). The same call again (its reply was lost)
# returns what the first returned, so whoever ended the job still learns it did, and counts it and
# sends its webhook.
FINISH_PAGE = _KEYS + _FINAL + _CLOSE + """
local page, text, now, model_id, model_revision, ttl, field, truncated, token = unpack(ARGV, 3, 11)
token = token or ''
redis.call('HDEL', inflight, field)
if not st then return {'gone', 0, 0} end
local total = tonumber(redis.call('HGET', record, 'pages_total'))
if token ~= '' then
  local mine = redis.call('HGET', attempts, 'f:' .. page)
  if mine then
    local by, done = string.match(mine, '^(%S+) (%d+)$')
    if by == token then return {'recorded', tonumber(done), total} end
  end
end
if final then return {'final', 0, total} end
if redis.call('HSETNX', pages, page, text) == 0 then return {'duplicate', 0, total} end
if truncated == '1' then redis.call('HSET', pages, 't:' .. page, '1') end  -- read back by pages()
local done = redis.call('HINCRBY', record, 'pages_done', 1)
if token ~= '' then redis.call('HSET', attempts, 'f:' .. page, token .. ' ' .. done) end
if redis.call('HGET', record, 'counted') == '1' then redis.call('DECR', owner_pages_key()) end
redis.call('HSET', record, 'model_id', model_id, 'model_revision', model_revision)
if done >= total then
  close('succeeded', now, ttl, '', '')
else
  redis.call('PUBLISH', events, 'progress')
end
return {'recorded', done, total}
"""

# Returns job.Ending: 'ended' by this call, 'final' when it had ended already, 'young' (max age in ms
# not reached; 0: any age) or 'gone'.
FINISH_JOB = _KEYS + _NOW_MS + _FINAL + _CLOSE + """
local status, now, code, message, ttl, max_age = unpack(ARGV, 3, 8)
if not st then return 'gone' end
if final then return 'final' end
max_age = tonumber(max_age)
if max_age > 0 and now_ms() - tonumber(redis.call('HGET', record, 'created_ms') or '0') < max_age then
  return 'young'
end
close(status, now, ttl, code, message)
return 'ended'
"""

# Oldest live jobs first. KEYS: the live index. ARGV: max age in ms, most to return.
OVERDUE = _NOW_MS + """
local live = KEYS[1]
local max_age, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
return redis.call('ZRANGEBYSCORE', live, '-inf', now_ms() - max_age, 'LIMIT', 0, limit)
"""

# Removes a job, releasing what it counted. Returns how many of its keys existed, or -1, removing nothing,
# when ARGV[3] is '1' and a retry with the job's Idempotency-Key has vouched for it (VOUCH below).
DISCARD = _KEYS + _OWNER + """
if ARGV[3] == '1' and redis.call('HGET', record, 'vouched') == '1' then return -1 end
local idem = redis.call('HGET', record, 'idem_key')
uncount()
local id = redis.call('HGET', record, 'id')
if id then
  redis.call('ZREM', live, id)
  redis.call('ZREM', outbox, id)
end
local n = redis.call('DEL', record, input, pages, attempts)
if idem and idem ~= '' then redis.call('DEL', idem) end
return n
"""

# A retry with the job's Idempotency-Key is about to answer with this job: from now on the request that
# made it may not abandon it. KEYS: the record. Returns 1, or 0 when the record is gone (abandoned first).
VOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'vouched', '1')
return 1
"""
