-- requeue: move dead letters back to the stream they came from, as new entries with
-- their original fields, and reset their tasks to PENDING. Each entry moves atomically
-- (it is either still dead or queued again, never both nor neither). A chord or chain
-- that the dead letter already failed stays failed.
--
-- KEYS[1]      key prefix (task hashes and target streams derive from it)
-- KEYS[2]      the queue's dead-letter stream
-- KEYS[3]      fallback stream (the queue's default priority) when the entry names none
-- ARGV[1]      group name
-- ARGV[2]      now, in ms
-- ARGV[3]      ttl (s) of the requeued task's record
-- ARGV[4..]    pairs: entry_id, task name ('' when unknown)
-- Returns      {entry_id, ...} of the entries requeued (missing ids are skipped)

local prefix = KEYS[1]
local dead = KEYS[2]
local fallback = KEYS[3]
local group = ARGV[1]
local now_ms = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])

local COPIED = {'id', 'ct', 'm', 'exp', 'r', 'cid', 'cix', 'tail'}
local queue = string.match(fallback, '^.*:q:(.*):%d$')

local function target(f)
  local s = f['stream']
  -- Only a stream of this namespace and queue: the field came from a stream entry.
  if s and string.sub(s, 1, #prefix + 2 + #queue + 1) == prefix .. 'q:' .. queue .. ':' then
    return s
  end
  return fallback
end

local function reset(id, name)
  local tkey = prefix .. 't:' .. id
  redis.call('HDEL', tkey, 'result', 'ct', 'exc_type', 'exc_message', 'traceback',
    'finished_at', 'started_at', 'worker', 'failed_task_id')
  redis.call('HSET', tkey, 'state', 'PENDING', 'queue', queue, 'enqueued_at', now_ms)
  if name ~= '' and redis.call('HEXISTS', tkey, 'name') == 0 then
    redis.call('HSET', tkey, 'name', name)
  end
  redis.call('PEXPIRE', tkey, ttl * 1000)
  notify(prefix, id, 'PENDING')
end

local out = {}
for i = 4, #ARGV, 2 do
  local entry_id, name = ARGV[i], ARGV[i + 1]
  local found = redis.call('XRANGE', dead, entry_id, entry_id)
  if found[1] then
    local f = fields_map(found[1][2])
    local cmd = {'XADD', target(f), '*'}
    for _, k in ipairs(COPIED) do
      if f[k] then
        cmd[#cmd + 1] = k
        cmd[#cmd + 1] = f[k]
      end
    end
    if #cmd > 3 then
      -- A stream deleted meanwhile comes back with its group, reading from the start.
      redis.pcall('XGROUP', 'CREATE', cmd[2], group, '0', 'MKSTREAM')
      redis.call(unpack(cmd))
      if f['id'] then reset(f['id'], name) end
      redis.call('XDEL', dead, entry_id)
      out[#out + 1] = entry_id
    end
  end
end
return out
