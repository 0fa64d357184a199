-- finish: apply a batch of operations atomically, one after another. The worker sends
-- every finished task of a batch in one call; a canvas is sent through it too.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    streams the ops refer to (declared for the reader; ops name them)
-- ARGV[1]      now, in ms
-- ARGV[2]      msgpack array of ops, each a map with `op` naming it (contract.py):
--   {op='done', stream, entry, id, state, ttl, fields={name, value, ...}, ignore_result?,
--    linked?, cid?, cix?, tail?, value?, slot?}
--          Store the final state and fields, XACK + XDEL the entry, wake the waiters,
--          and settle the chord and the chain tail that depend on the task. `linked`:
--          a chain goes on from it (its chord hears from the chain's end); `value`: the
--          result as a chord body reads it ("<content type>\n<bytes>").
--   {op='ack', stream, entry, id?, slot?}
--          XACK + XDEL an entry whose task goes on elsewhere (a retry, a deferral),
--          giving back the concurrency slot it held (slot = {key, limit, lease}).
--   {op='wait', stream, entry, id, key, limit, lease}
--          Park an entry over its key's concurrency limit: its task reads SCHEDULED until
--          a slot frees, then the entry goes back to its stream with a slot reserved.
--   {op='dead', stream, entry, id, queue, exc_type, exc_message, ttl, fields}
--          Move an entry that must not run (undecodable, unknown task) to the queue's
--          dead-letter stream with its original fields (`fields`: as the worker read
--          them, used when the entry is gone), and fail its task.
--   {op='enqueue', mode, task}      task: a task record, as for enqueue.lua
--   {op='replaced', id}
--          The running task is replaced by a canvas whose final task has its id: it
--          reads PENDING until that task runs, and that task's enqueue takes its place
--          (record, reply channel, errbacks). Followed by the replacement's 'enqueue'
--          and 'chord' ops and an 'ack' of the entry.
--   {op='chord', id, ttl, n, body, on_error?}
--          Create a chord's counter hash (skipped when it exists: a replay). body and
--          on_error are task records, stored whole and enqueued when the chord settles;
--          the body's `delay` (its countdown) counts from when its headers are done.
--          Its headers are enqueued by 'enqueue' ops.
-- Returns      number of ops applied

begin(KEYS)
local now_ms = tonumber(ARGV[1])
local ops = unpack_arg(ARGV[2])
defer_acks()
batch_replies()

-- Whether a task was revoked, or asked to be while it ran.
local function revoked(id)
  local h = redis.call('HMGET', K.task(id), 'state', 'revoked_at')
  return h[1] == 'REVOKED' or h[2] ~= false
end

local function done(op)
  local id, state, ttl = op.id, op.state, tonumber(op.ttl)
  -- One read for the revoke check and for what write_final needs (FINAL_READ).
  local h = redis.call('HMGET', K.task(id), 'state', 'revoked_at', unpack(FINAL_READ))
  if h[1] == 'REVOKED' or h[2] then
    -- Revoked while it ran (without terminate): it ends revoked, and what depends on
    -- it is settled as revoked.
    settle_unrun(id, 'REVOKED', nil, nil, op.cid, op.cix, op.tail, ttl, now_ms)
  else
    -- fields: flat (name, value, ...); the values the settling reads are picked out.
    local f = op.fields
    local ct, result, exc_type, exc_message
    for i = 1, #f, 2 do
      local k = f[i]
      if k == 'result' then result = f[i + 1]
      elseif k == 'ct' then ct = f[i + 1]
      elseif k == 'exc_type' then exc_type = f[i + 1]
      elseif k == 'exc_message' then exc_message = f[i + 1]
      end
    end
    if op.ignore_result == 1 and state == 'SUCCESS' and result then
      f, ct, result = flat_without(f, 'result', 'ct', {}), nil, nil
    end
    local watched = h[7]
    -- A hash without a state was lost (a restart, a failover): publish as if watched.
    if not h[1] then watched = nil end
    write_final(id, state, f, ttl, now_ms, {h[3], h[4], h[5], h[6], watched, h[8]}, ct, result,
      exc_type, exc_message)
    if state ~= 'SUCCESS' then
      fail_task(op.tail, state, exc_type, exc_message, ttl, now_ms)
    end
    if op.cid and (state ~= 'SUCCESS' or op.linked ~= 1) then
      settle_chord(op.cid, op.cix, id, state, op.value or '', exc_type, exc_message,
        now_ms)
    end
  end
  release_slot(op.slot, id, now_ms)
  -- Acked last (at the end of the batch): a script error above (they are not rolled
  -- back) leaves it pending.
  ack(op.stream, op.entry)
end

-- Park an entry over its key's concurrency limit until a slot frees (unless one freed
-- since the worker asked: then it goes straight back to its stream).
local function wait(op)
  local f = entry_fields(op.stream, op.entry)
  if f then
    local wk = K.slot_waiters(op.key)
    redis.call('RPUSH', wk, cmsgpack.pack({stream = op.stream, id = op.id, fields = f,
      limit = op.limit, lease = op.lease}))
    redis.call('PEXPIRE', wk, 86400000)
    redis.call('SADD', K.slot_keys(), op.key)
    redis.call('HSET', K.task(op.id), 'state', 'SCHEDULED')
    redis.call('HDEL', K.task(op.id), 'started_at', 'worker', '_e', '_st')
    redis.call(PUBLISH, K.done_channel(op.id), 'SCHEDULED')
    journal('SCHEDULED', op.id)
  end
  ack(op.stream, op.entry)
  wake(op.key, tonumber(op.limit), now_ms, tonumber(op.lease))
end

local function dead(op)
  local f, flat = entry_fields(op.stream, op.entry)
  if f == nil then
    -- Gone from its stream meanwhile (a purge): the fields the worker read stand in.
    f, flat = op.fields or {}, {}
    for k, v in pairs(f) do
      flat[#flat + 1] = k
      flat[#flat + 1] = v
    end
  end
  dead_letter(op.stream, op.entry, flat, f, op.queue, op.exc_type, op.exc_message,
    tonumber(op.ttl), now_ms)
end

local function replaced(op)
  local tkey = K.task(op.id)
  if FINAL[redis.call('HGET', tkey, 'state') or ''] then return end  -- revoked meanwhile
  redis.call('HSET', tkey, 'state', 'PENDING', '_replaced', 1)
  redis.call('HDEL', tkey, 'started_at', 'worker', '_e', '_st')
  redis.call(PUBLISH, K.done_channel(op.id), 'PENDING')
end

local function chord(op)
  local ck = K.chord(op.id)
  if redis.call('EXISTS', ck) == 1 then return end  -- created already: this op is a replay
  local ttl = tonumber(op.ttl)
  redis.call('HSET', ck, 'ttl', ttl, 'n', op.n, 'done', 0, 'body', cmsgpack.pack(op.body))
  if op.on_error then redis.call('HSET', ck, 'on_error', cmsgpack.pack(op.on_error)) end
  redis.call('PEXPIRE', ck, ttl * 1000)
end

for _, op in ipairs(ops) do
  local name = op.op
  if name == 'done' then
    done(op)
  elseif name == 'ack' then
    release_slot(op.slot, op.id, now_ms)
    ack(op.stream, op.entry)
  elseif name == 'wait' then
    wait(op)
  elseif name == 'dead' then
    dead(op)
  elseif name == 'enqueue' then
    local t = op.task
    if (op.mode == 'retry' or op.mode == 'defer') and revoked(t.id) then
      -- Revoked while it ran: it ends here, never to run again.
      settle_unrun(t.id, 'REVOKED', nil, nil, t.cid, t.cix, t.tail, tonumber(t.ttl), now_ms)
    else
      enqueue_task(op.mode, t, now_ms)
      redis.call('SADD', K.queues(), t.queue)
    end
  elseif name == 'chord' then
    chord(op)
  elseif name == 'replaced' then
    replaced(op)
  else
    return redis.error_reply('finish.lua: unknown op ' .. tostring(name))
  end
end
flush_replies()
flush_acks()
flush_journal(now_ms)
return #ops
