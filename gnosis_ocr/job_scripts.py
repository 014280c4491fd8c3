"""The job store's Lua scripts: every state change of a job is one of these, atomic in Redis.

Keys, in this order for every script (`JobStore._k`):
  1 record, 2 input, 3 pages, 4 attempts, 5 events, 6 live index, 7 queued-bytes counter,
  8 the claiming worker's in-flight hash (page scripts only).
The owner's pending-pages counter is named from the record inside the scripts (one Redis, not a cluster).

A live job has no expiry: its retention clock (GNOSIS_JOB_TTL) starts when it becomes final, in
`close` below. Times that decide anything come from Redis's own clock (TIME), never a host's.
"""

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

_FINAL = """
local st = redis.call('HGET', KEYS[1], 'status')
local final = (st == 'succeeded' or st == 'failed' or st == 'cancelled')
"""

# Moves a live job to its final state: frees its input (and the queued-bytes it counted), starts the
# retention clock on what stays, takes it off the live index and wakes long-polls.
_OWNER = """
local function owner_pages_key()
  return 'gnosis:owner:' .. (redis.call('HGET', KEYS[1], 'owner') or '') .. ':pages'
end
-- What a live job counts against the queue bounds: its input bytes, and its owner's pages not yet done.
local function uncount()
  if redis.call('HGET', KEYS[1], 'counted') ~= '1' then return end
  redis.call('DECRBY', KEYS[7], tonumber(redis.call('HGET', KEYS[1], 'input_bytes') or '0'))
  local left = tonumber(redis.call('HGET', KEYS[1], 'pages_total') or '0') -
               tonumber(redis.call('HGET', KEYS[1], 'pages_done') or '0')
  redis.call('DECRBY', owner_pages_key(), left)
  redis.call('HSET', KEYS[1], 'counted', '0')
end
"""

# Moves a live job to its final state: frees its input (and what it counted against the bounds),
# starts the retention clock on what stays, takes it off the live index and wakes long-polls.
_CLOSE = _OWNER + """
local function close(status, now, ttl, code, message)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', now)
  if code ~= '' then redis.call('HSET', KEYS[1], 'error_code', code, 'error_message', message) end
  redis.call('DEL', KEYS[2])
  uncount()
  for _, i in ipairs({1, 3, 4}) do redis.call('EXPIRE', KEYS[i], ttl) end
  local idem = redis.call('HGET', KEYS[1], 'idem_key')
  if idem and idem ~= '' then redis.call('EXPIRE', idem, ttl) end
  local id = redis.call('HGET', KEYS[1], 'id')
  redis.call('ZREM', KEYS[6], id)
  -- The webhook is owed from this very transition: in the outbox (job.OUTBOX_KEY, scored by when it is
  -- due) until a delivery settles it, so a crash between this commit and the publish loses none.
  local callback = redis.call('HGET', KEYS[1], 'callback_url')
  if callback and callback ~= '' then
    redis.call('ZADD', 'gnosis:webhooks:outbox', 'NX', tonumber(redis.call('TIME')[1]), id)
  end
  -- A batch's document is owed its result and its count the same way (batch.ENDS_KEY).
  local batch = redis.call('HGET', KEYS[1], 'batch')
  if batch and batch ~= '' then
    redis.call('ZADD', 'gnosis:batch-ends', 'NX', tonumber(redis.call('TIME')[1]), id)
  end
  redis.call('PUBLISH', KEYS[5], status)
end
"""

# ARGV: job id, input bytes (may be empty: stored elsewhere), input size, idempotency key or '', pages,
# owner, the key's claim this request holds, then field/value pairs of the record. Returns the creation
# time in ms (Redis's clock), or -1, writing nothing, when the key no longer holds this request's claim
# (a retry took it over while this request was slow): one key, one job.
CREATE = _NOW_MS + """
if ARGV[4] ~= '' and redis.call('GET', ARGV[4]) ~= ARGV[7] then return -1 end
local created = now_ms()
redis.call('HSET', KEYS[1], 'created_ms', created, 'input_bytes', ARGV[3], 'counted', '1', unpack(ARGV, 8))
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2]) end
redis.call('ZADD', KEYS[6], created, ARGV[1])
redis.call('INCRBY', KEYS[7], tonumber(ARGV[3]))
redis.call('INCRBY', 'gnosis:owner:' .. ARGV[6] .. ':pages', tonumber(ARGV[5]))
redis.call('SADD', 'gnosis:owners', ARGV[6])  -- OWNERS_KEY: whose backlog /metrics reports
-- The key was claimed with an expiry before the job existed; from now on it lives as long as the job.
if ARGV[4] ~= '' then redis.call('PERSIST', ARGV[4]) end
return created
"""

# ARGV: page, now, max attempts, in-flight field, in-flight value, want input (1/0), ttl, delivery token.
# Returns {verdict} or {'run', input or false, kind, options or false}; on 'run' the page is in the
# worker's in-flight hash.
# The token is one execution of the page's task: the same call again (a client retrying after a lost
# reply) counts no second attempt and gets the answer the first one got.
START_PAGE = _FINAL + _CLOSE + """
local field = ARGV[4]
local token = ARGV[8] or ''
if token ~= '' and redis.call('HGET', KEYS[4], 'x:' .. ARGV[1]) == token then
  redis.call('HDEL', KEYS[8], field)
  return {'exhausted'}
end
if not st or final or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[8], field)
  if not st then return {'gone'} end
  if final then return {'final'} end
  return {'done'}
end
local n
if token ~= '' and redis.call('HGET', KEYS[4], 'k:' .. ARGV[1]) == token then
  n = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '1')
else
  n = redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  if token ~= '' then redis.call('HSET', KEYS[4], 'k:' .. ARGV[1], token) end
end
if n > tonumber(ARGV[3]) then
  redis.call('HDEL', KEYS[8], field)
  if token ~= '' then redis.call('HSET', KEYS[4], 'x:' .. ARGV[1], token) end
  close('failed', ARGV[2], ARGV[7], 'worker_lost', 'Page ' .. (tonumber(ARGV[1]) + 1) .. ' was delivered ' ..
    (n - 1) .. ' times and its worker never finished it; the job was stopped.')
  return {'exhausted'}
end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2])
  redis.call('PUBLISH', KEYS[5], 'running')
end
redis.call('HSET', KEYS[8], field, ARGV[5])
local data = false
if ARGV[6] == '1' then data = redis.call('GET', KEYS[2]) end
return {'run', data, redis.call('HGET', KEYS[1], 'kind'), redis.call('HGET', KEYS[1], 'options')}
"""

# ARGV: page, text, now, model id, model revision, ttl, in-flight field, truncated (1/0), delivery token.
# Returns {outcome, pages done, pages total}: outcome 'recorded', 'gone', 'final' or 'duplicate'. The
# same call again (its reply was lost) returns what the first returned, so whoever ended the job still
# learns it did, and counts it and sends its webhook.
FINISH_PAGE = _FINAL + _CLOSE + """
redis.call('HDEL', KEYS[8], ARGV[7])
if not st then return {'gone', 0, 0} end
local total = tonumber(redis.call('HGET', KEYS[1], 'pages_total'))
local token = ARGV[9] or ''
if token ~= '' then
  local mine = redis.call('HGET', KEYS[4], 'f:' .. ARGV[1])
  if mine then
    local by, done = string.match(mine, '^(%S+) (%d+)$')
    if by == token then return {'recorded', tonumber(done), total} end
  end
end
if final then return {'final', 0, total} end
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then return {'duplicate', 0, total} end
if ARGV[8] == '1' then redis.call('HSET', KEYS[3], 't:' .. ARGV[1], '1') end  -- read back by pages()
local done = redis.call('HINCRBY', KEYS[1], 'pages_done', 1)
if token ~= '' then redis.call('HSET', KEYS[4], 'f:' .. ARGV[1], token .. ' ' .. done) end
if redis.call('HGET', KEYS[1], 'counted') == '1' then redis.call('DECR', owner_pages_key()) end
redis.call('HSET', KEYS[1], 'model_id', ARGV[4], 'model_revision', ARGV[5])
if done >= total then
  close('succeeded', ARGV[3], ARGV[6], '', '')
else
  redis.call('PUBLISH', KEYS[5], 'progress')
end
return {'recorded', done, total}
"""

# ARGV: status, now, error code, error message, ttl, max age in ms (0: any age).
# Returns the new status, 'was_<status>' when already final, 'young' (max age not reached) or 'gone'.
FINISH_JOB = _NOW_MS + _FINAL + _CLOSE + """
if not st then return 'gone' end
if final then return 'was_' .. st end
local max_age = tonumber(ARGV[6])
if max_age > 0 and now_ms() - tonumber(redis.call('HGET', KEYS[1], 'created_ms') or '0') < max_age then
  return 'young'
end
close(ARGV[1], ARGV[2], ARGV[5], ARGV[3], ARGV[4])
return ARGV[1]
"""

# Oldest live jobs first. KEYS: live index. ARGV: max age in ms, most to return.
OVERDUE = _NOW_MS + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
"""

# KEYS: record, input, pages, attempts, events, live, queued bytes. Removes a job, releasing what it counted.
DISCARD = _OWNER + """
local idem = redis.call('HGET', KEYS[1], 'idem_key')
uncount()
local id = redis.call('HGET', KEYS[1], 'id')
if id then
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZREM', 'gnosis:webhooks:outbox', id)
end
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
if idem and idem ~= '' then redis.call('DEL', idem) end
return n
"""
