-- Shared helpers. scripts.py prepends this file to every other script, so each
-- script stays one atomic EVALSHA while the logic lives in one place.
--
-- Key layout (all keys derive from `prefix`, e.g. "{aiotasks}:", so they share one slot):
--   prefix.."t:"..id          task hash
--   prefix.."done:"..id       pub/sub channel of a task's state changes
--   prefix.."delayed"         zset of scheduled task ids, score = due time in ms
--   prefix.."dead:"..queue    dead-letter stream
--   prefix.."chord:"..cid     chord hash; prefix.."chord:"..cid..":r" its header results

local FINAL = {SUCCESS = true, FAILURE = true, REVOKED = true}
local LIVE = {PENDING = true, SCHEDULED = true, STARTED = true}

-- Wake whoever waits on a task: its own channel carries the state (for updates() and
-- handles of other processes); the reply channel of the process that sent it (stored in
-- the task hash) carries the final state, and the encoded result, to result() waiters.
local function notify(prefix, id, state, ct, result)
  redis.call('PUBLISH', prefix .. 'done:' .. id, state)
  local reply = redis.call('HGET', prefix .. 't:' .. id, 'reply')
  if reply then
    local msg = id .. '\n' .. state
    if ct and result then msg = msg .. '\n' .. ct .. '\n' .. result end
    redis.call('PUBLISH', reply, msg)
  end
end

-- Whether an entry is pending for this consumer (delivered to it, not yet acked).
-- pcall: a stream that vanished (purged, or the server lost its data) has no group.
local function held_by(stream, group, entry_id, consumer)
  local p = redis.pcall('XPENDING', stream, group, entry_id, entry_id, 1, consumer)
  return type(p) == 'table' and not p.err and p[1] ~= nil
end

-- Put a ready message on its stream and mark it PENDING.
local function xadd_task(prefix, stream, id, name, queue, payload, ct, extra, ttl, now_ms)
  local fields = {'XADD', stream, '*', 'id', id, 'ct', ct, 'm', payload}
  for i = 1, #extra, 2 do
    if extra[i + 1] ~= '' then
      fields[#fields + 1] = extra[i]
      fields[#fields + 1] = extra[i + 1]
    end
  end
  local entry_id = redis.call(unpack(fields))
  local tkey = prefix .. 't:' .. id
  -- _e/_st name the task's one live entry: an older entry of the same id (revoked, then
  -- sent again) is stale and must not run, and a revoke deletes the entry outright.
  redis.call('HSET', tkey, 'state', 'PENDING', 'name', name, 'queue', queue,
    'enqueued_at', now_ms, '_e', entry_id, '_st', stream)
  redis.call('PEXPIRE', tkey, ttl * 1000)
end

-- Keep a message in the delayed zset until due_ms, its entry fields in the task hash
-- (fetch.lua adds the entry to stream `_s` when it is due) and mark it SCHEDULED.
local function schedule_task(prefix, stream, id, name, queue, payload, ct, extra, ttl, now_ms,
                             due_ms)
  local tkey = prefix .. 't:' .. id
  local h = {'HSET', tkey, 'state', 'SCHEDULED', 'name', name, 'queue', queue,
    'enqueued_at', now_ms, 'eta', due_ms, '_s', stream, '_m', payload, '_ct', ct}
  for i = 1, #extra, 2 do
    if extra[i + 1] ~= '' then
      h[#h + 1] = '_' .. extra[i]
      h[#h + 1] = extra[i + 1]
    end
  end
  redis.call(unpack(h))
  redis.call('PEXPIRE', tkey, ttl * 1000 + (due_ms - now_ms))
  redis.call('ZADD', prefix .. 'delayed', due_ms, id)
end

-- Enqueue one task t = {id, name, queue, stream, payload, content_type, due_ms, ttl_s,
-- exp_ms, r, cid, cix, tail, reply} (see enqueue.lua), on its stream now or in the
-- delayed zset when due_ms > now_ms.
-- mode 'send': skip when the id is queued, scheduled or running (dedup);
-- mode 'follow': skip when the id exists at all (a continuation enqueued twice);
-- mode 'retry': the running task again, unless that retry number is already enqueued
-- (a finish replayed after a lost reply) or the task is final (revoked meanwhile);
-- mode 'defer': the same message later (a rate limit), unless final or scheduled.
-- Returns 1 when enqueued, 0 when skipped.
local function enqueue_task(prefix, mode, t, now_ms)
  local id, name, queue, stream, payload, ct = t[1], t[2], t[3], t[4], t[5], t[6]
  local due_ms, ttl, reply = tonumber(t[7]), tonumber(t[8]), t[14]
  local extra = {'exp', t[9], 'r', t[10], 'cid', t[11], 'cix', t[12], 'tail', t[13]}
  local tkey = prefix .. 't:' .. id
  local cur = redis.call('HMGET', tkey, 'state', 'retries')
  local state = cur[1]
  local again = mode == 'retry' or mode == 'defer'
  if state and (mode == 'follow' or (mode == 'send' and LIVE[state])
      or (again and FINAL[state])
      or (mode == 'retry' and tonumber(cur[2] or 0) >= (tonumber(t[10]) or 0))
      or (mode == 'defer' and state == 'SCHEDULED')) then
    return 0
  end
  -- A new send of a finished id starts a clean record; a retry keeps its own.
  if state and not again then redis.call('DEL', tkey) end
  if t[10] ~= '' then redis.call('HSET', tkey, 'retries', t[10]) end
  if due_ms > now_ms then
    schedule_task(prefix, stream, id, name, queue, payload, ct, extra, ttl, now_ms, due_ms)
  else
    xadd_task(prefix, stream, id, name, queue, payload, ct, extra, ttl, now_ms)
  end
  if reply ~= '' then redis.call('HSET', tkey, 'reply', reply) end
  return 1
end

local function final_write(prefix, id, state, fields, ttl)
  local tkey = prefix .. 't:' .. id
  local cmd = {'HSET', tkey, 'state', state}
  local ct, result
  for i = 1, #fields, 2 do
    cmd[#cmd + 1] = fields[i]
    cmd[#cmd + 1] = fields[i + 1]
    if fields[i] == 'ct' then ct = fields[i + 1] elseif fields[i] == 'result' then
      result = fields[i + 1]
    end
  end
  redis.call(unpack(cmd))
  redis.call('HDEL', tkey, '_s', '_m', '_ct', '_exp', '_r', '_cid', '_cix', '_tail', '_e',
    '_st')
  redis.call('PEXPIRE', tkey, ttl * 1000)
  notify(prefix, id, state, ct, result)
end

local settle_chord

-- Fail a task that never ran (or whose predecessor failed): its waiters must wake.
-- failed_id: for a ChordError, the header task that failed.
local function fail_task(prefix, id, state, exc_type, exc_message, ttl, now_ms, failed_id)
  if not id or id == '' then return end
  local prev = redis.call('HGET', prefix .. 't:' .. id, 'state')
  if prev and FINAL[prev] then return end
  local fields = {'finished_at', now_ms}
  if state == 'FAILURE' then
    fields = {'finished_at', now_ms, 'exc_type', exc_type, 'exc_message', exc_message}
    if failed_id then
      fields[#fields + 1] = 'failed_task_id'
      fields[#fields + 1] = failed_id
    end
  end
  final_write(prefix, id, state, fields, ttl)
end

-- Record a header's final state for its chord. Idempotent per header index; the call
-- that records the last success enqueues the body, once, behind the `fired` flag.
settle_chord = function(prefix, cid, idx, id, state, value, exc_type, exc_message, now_ms)
  local ck = prefix .. 'chord:' .. cid
  if redis.call('EXISTS', ck) == 0 or redis.call('HEXISTS', ck, 'fired') == 1 then
    return
  end
  local ttl = tonumber(redis.call('HGET', ck, 'ttl'))
  local rk = ck .. ':r'
  if state == 'SUCCESS' then
    if redis.call('HSETNX', rk, idx, value) == 0 then return end
    redis.call('PEXPIRE', rk, ttl * 1000)
    local done = redis.call('HINCRBY', ck, 'done', 1)
    if done < tonumber(redis.call('HGET', ck, 'n')) then return end
    redis.call('HSET', ck, 'fired', 'body')
    local b = redis.call('HMGET', ck, 'b_id', 'b_name', 'b_queue', 'b_stream', 'b_m', 'b_ct',
      'b_exp', 'b_cid', 'b_cix', 'b_tail', 'b_eta', 'b_delay')
    local extra = {'exp', b[7] or '', 'cid', b[8] or '', 'cix', b[9] or '', 'tail', b[10] or ''}
    -- The body's own eta (absolute) or countdown (from now, when its headers are done).
    local due_ms = math.max(tonumber(b[11]) or 0, now_ms + (tonumber(b[12]) or 0))
    if due_ms > now_ms then
      schedule_task(prefix, b[4], b[1], b[2], b[3], b[5], b[6], extra, ttl, now_ms, due_ms)
    else
      xadd_task(prefix, b[4], b[1], b[2], b[3], b[5], b[6], extra, ttl, now_ms)
    end
    return
  end
  redis.call('HSET', ck, 'fired', 'error', 'failed_id', id, 'exc_type', exc_type or state,
    'exc_message', exc_message or '')
  redis.call('DEL', rk)
  local b = redis.call('HMGET', ck, 'b_id', 'b_cid', 'b_cix', 'b_tail')
  local msg = 'header task ' .. id .. ' ended ' .. state
  if exc_type and exc_type ~= '' then
    msg = msg .. ': ' .. exc_type .. ': ' .. (exc_message or '')
  end
  final_write(prefix, b[1], 'FAILURE', {'finished_at', now_ms, 'exc_type', 'ChordError',
    'exc_message', msg, 'failed_task_id', id}, ttl)
  fail_task(prefix, b[4], 'FAILURE', 'ChordError', msg, ttl, now_ms, id)
  if b[2] and b[2] ~= '' then
    settle_chord(prefix, b[2], b[3], b[1], 'FAILURE', '', 'ChordError', msg, now_ms)
  end
  local e = redis.call('HMGET', ck, 'e_id', 'e_name', 'e_queue', 'e_stream', 'e_m', 'e_ct')
  if e[1] then
    xadd_task(prefix, e[4], e[1], e[2], e[3], e[5], e[6], {}, ttl, now_ms)
  end
end

-- A task that will not run (revoked, expired, dead-lettered) still settles what waits on it.
local function settle_unrun(prefix, id, state, exc_type, exc_message, cid, cix, tail, ttl,
                            now_ms)
  fail_task(prefix, id, state, exc_type, exc_message, ttl, now_ms)
  fail_task(prefix, tail, state, exc_type, exc_message, ttl, now_ms)
  if cid and cid ~= '' then
    settle_chord(prefix, cid, cix, id, state, '', exc_type, exc_message, now_ms)
  end
end

local function fields_map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

-- Decide whether a delivered entry runs: an expired or revoked one is settled, acked
-- and deleted here instead. Marks a running one STARTED. Returns true to run it.
local function start_entry(prefix, stream, group, entry_id, f, now_ms, worker, deliveries,
                           default_ttl)
  local id = f['id']
  if not id then return true end  -- undecodable: the worker dead-letters it
  local tkey = prefix .. 't:' .. id
  local h = redis.call('HMGET', tkey, 'state', '_e')
  if h[2] and h[2] ~= entry_id then
    -- A stale entry: the id was revoked and sent again, and that newer entry runs.
    redis.call('XACK', stream, group, entry_id)
    redis.call('XDEL', stream, entry_id)
    return false
  end
  local state = h[1]
  local exp = tonumber(f['exp'])
  if state == 'REVOKED' or (exp and exp < now_ms) then
    redis.call('XACK', stream, group, entry_id)
    redis.call('XDEL', stream, entry_id)
    settle_unrun(prefix, id, 'REVOKED', nil, nil, f['cid'], f['cix'], f['tail'], default_ttl,
      now_ms)
    return false
  end
  redis.call('HSET', tkey, 'state', 'STARTED', 'started_at', now_ms, 'worker', worker,
    'attempts', (tonumber(f['r']) or 0) + deliveries)
  redis.call('PUBLISH', prefix .. 'done:' .. id, 'STARTED')
  return true
end
