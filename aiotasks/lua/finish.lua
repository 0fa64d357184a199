-- finish: apply a batch of operations atomically, one after another. The worker sends
-- every finished task of a batch in one call; a canvas is sent through it too.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    streams the ops refer to (declared for the reader; ops name them)
-- ARGV[1]      now, in ms
-- ARGV[2]      msgpack array of ops, each a map with `op` naming it (contract.py), or a
--              done op in its flat form: 12 values inline in the array (stream, entry, id,
--              state, ttl, flags: 1 ignore_result + 2 linked, cid, cix, tail, value,
--              slot: each false when absent), then n, then the n values of its fields
--              (contract.wire_ops; a map per op cost Redis a sixth of the call to unpack):
--   {op='done', stream, entry, id, state, ttl, fields={name, value, ...}, ignore_result?,
--    linked?, cid?, cix?, tail?, value?, slot?}
--          Store the final state and fields, XACK + XDEL the entry, wake the waiters,
--          and settle the chord and the chain tail that depend on the task. `linked`:
--          a chain goes on from it (its chord hears from the chain's end); `value`: the
--          result as a chord body reads it ("<content type>\n<bytes>").
--   {op='ack', stream, entry, id?, slot?}
--          XACK + XDEL an entry whose task goes on elsewhere (a retry, a deferral),
--          giving back the concurrency slot it held (slot = {key, limit, lease}).
--   {op='wait', stream, entry, id, key, limit, lease, deliveries?}
--          Park an entry over its key's concurrency limit: its task reads SCHEDULED until
--          a slot frees, then the entry goes back to its stream with a slot reserved.
--          `deliveries`: the task's so far, this one included; the new entry carries the
--          others in its `dl` field (they count towards attempts and max_deliveries).
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
-- Returns      number of ops applied; an error reply, with none applied, when an enqueue
--              or chord op carries a mode or record outside the contract (op_problem)

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

-- A done op's fields as arguments (see the header); `f`[a..b] holds its fields.
local function done(stream, entry, id, state, ttl, ignore_result, linked, cid, cix, tail,
                    value, slot, f, a, b)
  ttl = tonumber(ttl)
  -- One read for the revoke check and for what write_final needs (FINAL_READ).
  local h = redis.call('HMGET', K.task(id), 'state', 'revoked_at', unpack(FINAL_READ))
  if h[1] == 'REVOKED' or h[2] then
    -- Revoked while it ran (without terminate): it ends revoked, and what depends on
    -- it is settled as revoked.
    settle_unrun(id, 'REVOKED', nil, nil, cid, cix, tail, ttl, now_ms)
  else
    -- The values the settling reads, picked out of the fields.
    local ct, result, exc_type, exc_message = pick(f, a, b, 'ct', 'result', 'exc_type',
      'exc_message')
    if ignore_result == 1 and state == 'SUCCESS' and result then
      f, ct, result = flat_without({unpack(f, a, b)}, 'result', 'ct', {}), nil, nil
      a, b = 1, #f
    end
    local watched = h[7]
    -- A hash without a state was lost (a restart, a failover): publish as if watched.
    if not h[1] then watched = nil end
    write_final(id, state, f, ttl, now_ms, {h[3], h[4], h[5], h[6], watched, h[8]}, ct, result,
      exc_type, exc_message, a, b)
    if state ~= 'SUCCESS' and tail then
      -- The chain's last task fails as this step did, naming it, with its traceback.
      fail_task(tail, state, exc_type, exc_message, ttl, now_ms, id, pick(f, a, b, 'traceback'))
    end
    if cid and (state ~= 'SUCCESS' or linked ~= 1) then
      settle_chord(cid, cix, id, state, value or '', exc_type, exc_message, now_ms)
    end
  end
  release_slot(slot, id, now_ms)
  -- Acked last (at the end of the batch): a script error above (they are not rolled
  -- back) leaves it pending.
  ack(stream, entry)
end

-- Park an entry over its key's concurrency limit until a slot frees (unless one freed
-- since the worker asked: then it goes straight back to its stream).
local function wait(op)
  local f = entry_fields(op.stream, op.entry)
  if f then
    -- The deliveries before this one (runs a dying worker cut short) go with the task:
    -- the new entry starts its own count at 1.
    local before = (tonumber(op.deliveries) or 1) - 1
    if before > 0 then f.dl = txt(before) end
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

-- A done op in its flat form (contract.wire_ops): its 12 leading values and its fields
-- inline in `ops` from i. Returns the index past it.
local function flat_done(i)
  local stream, entry, id, state, ttl, flags, cid, cix, tail, value, slot, n =
    unpack(ops, i, i + 11)
  done(stream, entry, id, state, ttl, flags % 2, math.floor(flags / 2) % 2, cid, cix, tail,
    value, slot, ops, i + 12, i + 11 + n)
  return i + 12 + n
end

-- Each op by its name (its map form; a flat done op goes to flat_done).
local APPLY = {
  done = function(op)
    local f = op.fields
    done(op.stream, op.entry, op.id, op.state, op.ttl, op.ignore_result, op.linked, op.cid,
      op.cix, op.tail, op.value, op.slot, f, 1, #f)
  end,
  ack = function(op)
    release_slot(op.slot, op.id, now_ms)
    ack(op.stream, op.entry)
  end,
  wait = wait,
  dead = dead,
  enqueue = function(op)
    local t = op.task
    if (op.mode == 'retry' or op.mode == 'defer') and revoked(t.id) then
      -- Revoked while it ran: it ends here, never to run again.
      settle_unrun(t.id, 'REVOKED', nil, nil, t.cid, t.cix, t.tail, tonumber(t.ttl), now_ms)
    else
      enqueue_task(op.mode, t, now_ms)
      redis.call('SADD', K.queues(), t.queue)
    end
  end,
  chord = chord,
  replaced = replaced,
}

-- What is wrong with an op that carries task records from a caller (a producer's chord
-- and its headers), or nil: checked for every op before any is applied. A flat done op
-- is skipped over (12 values, then n and its n field values).
local good_queues = {}
local function op_problem(op)
  if op.op == 'enqueue' then
    if not MODES[op.mode] then return "unknown mode '" .. tostring(op.mode) .. "'" end
    return record_problem(op.task, good_queues)
  elseif op.op == 'chord' then
    if type(op.id) ~= 'string' or op.id == '' or type(op.n) ~= 'number' or op.n < 1
        or op.n % 1 ~= 0 or type(op.ttl) ~= 'number' or op.ttl < 1 or op.ttl % 1 ~= 0 then
      return "a chord needs 'id' (a string), 'n' (>= 1) and 'ttl' (seconds >= 1)"
    end
    local problem = record_problem(op.body, good_queues)
    if problem then return 'body: ' .. problem end
    problem = op.on_error ~= nil and record_problem(op.on_error, good_queues)
    if problem then return 'on_error: ' .. problem end
  elseif not APPLY[op.op] then
    return 'unknown op'
  end
  return nil
end

-- What is wrong with the first op that is wrong, or nil.
local function ops_problem()
  local k, nth = 1, 0
  while ops[k] ~= nil do
    nth = nth + 1
    local op = ops[k]
    -- A flat done op starts with its stream's name (indexing a string gives nil); a map
    -- without 'op' is refused as an unknown op, not walked as one.
    if op.op == nil and type(op) == 'string' then
      k = k + 12 + ops[k + 11]
    else
      local problem = op_problem(op)
      if problem then return 'op ' .. nth .. ' (' .. tostring(op.op) .. '): ' .. problem end
      k = k + 1
    end
  end
  return nil
end

-- One pcall for the whole check: a list that is not ops at all (a number where an op
-- goes, a map without 'op') breaks the walk itself.
local walked, problem = pcall(ops_problem)
if not walked then problem = 'the ops are not as the contract has them: ' .. tostring(problem) end
if problem then return redis.error_reply('finish.lua: ' .. problem .. ' (no op applied)') end

local applied, i = 0, 1
while ops[i] ~= nil do
  local op = ops[i]
  applied = applied + 1
  if type(op) ~= 'table' then
    i = flat_done(i)
  else
    i = i + 1
    APPLY[op.op](op)
  end
end
flush_replies()
flush_acks()
flush_journal(now_ms)
return applied
