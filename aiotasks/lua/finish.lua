-- finish: apply a batch of operations atomically, one after another. The worker sends
-- every finished task of a batch in one call; a canvas is sent through it too.
--
-- KEYS[1]      key prefix
-- KEYS[2..]    streams that 'done', 'ack' and 'dead' ops refer to by key index
-- ARGV[1]      now, in ms
-- ARGV[2]      msgpack array of ops, each an array starting with its name:
--   {'done', key_index, entry_id, task_id, state, ttl_s, ignore_result (0/1),
--    has_link (0/1), cid, cix, tail, chord_value, {field, value, ...}}
--          Store the final state and fields, XACK + XDEL the entry, wake the waiters,
--          and settle the chord and the chain tail that depend on the task.
--   {'ack', key_index, entry_id}
--          XACK + XDEL an entry whose task goes on elsewhere (a retry, a deferral).
--   {'dead', key_index, entry_id, task_id, queue, exc_type, exc_message, ttl_s,
--    {field, value, ...}}
--          Move an entry that cannot run (undecodable, unknown task) to the queue's
--          dead-letter stream with its original fields, and fail its task.
--   {'enqueue', mode, task}      task: the 14 values of enqueue.lua
--   {'chord', cid, ttl_s, n, body, on_error}
--          Create a chord's counter hash (skipped when it exists: a replay). body: id,
--          name, queue, stream, payload, content_type, exp, cid, cix, tail, eta_ms,
--          delay_ms (its countdown, counted from when the headers are done); on_error:
--          id, name, queue, stream, payload, content_type, or empty. Its headers are
--          enqueued by 'enqueue' ops.
-- Returns      number of ops applied

local prefix = KEYS[1]
local now_ms = tonumber(ARGV[1])
local ops = cmsgpack.unpack(ARGV[2])
local group = 'workers'

local function ack(key_index, entry_id)
  local stream = KEYS[tonumber(key_index)]
  redis.call('XACK', stream, group, entry_id)
  redis.call('XDEL', stream, entry_id)
end

local function done(op)
  ack(op[2], op[3])
  local id, state, ttl = op[4], op[5], tonumber(op[6])
  if redis.call('HGET', prefix .. 't:' .. id, 'state') == 'REVOKED' then
    -- Revoked while it ran (without terminate): it stays revoked, and what depends on
    -- it is settled as revoked.
    settle_unrun(prefix, id, 'REVOKED', nil, nil, op[9], op[10], op[11], ttl, now_ms)
    return
  end
  local ignore, has_link = tonumber(op[7]) == 1, tonumber(op[8]) == 1
  local cid, cix, tail, value, fields = op[9], op[10], op[11], op[12], op[13]
  local f = fields_map(fields)
  if ignore and state == 'SUCCESS' then
    notify(prefix, id, state)
    redis.call('DEL', prefix .. 't:' .. id)
  else
    final_write(prefix, id, state, fields, ttl)
  end
  if state ~= 'SUCCESS' then
    fail_task(prefix, tail, state, f['exc_type'], f['exc_message'], ttl, now_ms)
  end
  if cid ~= '' and (state ~= 'SUCCESS' or not has_link) then
    settle_chord(prefix, cid, cix, id, state, value, f['exc_type'], f['exc_message'], now_ms)
  end
end

local function dead(op)
  local stream = KEYS[tonumber(op[2])]
  local entry_id, id, queue, exc_type, exc_message = op[3], op[4], op[5], op[6], op[7]
  local ttl, flat = tonumber(op[8]), op[9]
  local cmd = {'XADD', prefix .. 'dead:' .. queue, '*'}
  for j = 1, #flat do cmd[#cmd + 1] = flat[j] end
  cmd[#cmd + 1] = 'reason'
  cmd[#cmd + 1] = exc_type .. ': ' .. exc_message
  cmd[#cmd + 1] = 'stream'
  cmd[#cmd + 1] = stream
  redis.call(unpack(cmd))
  ack(op[2], entry_id)
  if id ~= '' then
    local f = fields_map(flat)
    settle_unrun(prefix, id, 'FAILURE', exc_type, exc_message, f['cid'], f['cix'], f['tail'],
      ttl, now_ms)
  end
end

local BODY = {'b_id', 'b_name', 'b_queue', 'b_stream', 'b_m', 'b_ct', 'b_exp', 'b_cid',
  'b_cix', 'b_tail', 'b_eta', 'b_delay'}
local ERRBACK = {'e_id', 'e_name', 'e_queue', 'e_stream', 'e_m', 'e_ct'}

local function chord(op)
  local ck = prefix .. 'chord:' .. op[2]
  if redis.call('EXISTS', ck) == 1 then return end  -- created already: this op is a replay
  local ttl = tonumber(op[3])
  local h = {'HSET', ck, 'ttl', ttl, 'n', op[4], 'done', 0}
  for names, values in pairs({[BODY] = op[5], [ERRBACK] = op[6]}) do
    for j, name in ipairs(names) do
      local v = values[j]
      if v ~= nil and v ~= '' then
        h[#h + 1] = name
        h[#h + 1] = v
      end
    end
  end
  redis.call(unpack(h))
  redis.call('PEXPIRE', ck, ttl * 1000)
end

for _, op in ipairs(ops) do
  local name = op[1]
  if name == 'done' then
    done(op)
  elseif name == 'ack' then
    ack(op[2], op[3])
  elseif name == 'dead' then
    dead(op)
  elseif name == 'enqueue' then
    enqueue_task(prefix, op[2], op[3], now_ms)
    redis.call('SADD', prefix .. 'queues', op[3][3])
  elseif name == 'chord' then
    chord(op)
  else
    return redis.error_reply('finish.lua: unknown op ' .. tostring(name))
  end
end
return #ops
