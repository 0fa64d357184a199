-- requeue: move dead letters back to the stream they came from, as new entries with
-- their original fields, and reset their tasks to PENDING. Each entry moves atomically
-- (it is either still dead or queued again, never both nor neither). A chord or chain
-- that the dead letter already failed stays failed.
--
-- KEYS[1]      key prefix (task hashes and target streams derive from it)
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3]      the queue's dead-letter stream
-- KEYS[4]      fallback stream (the queue's default priority) when the entry names none
-- ARGV[1]      queue name
-- ARGV[2]      now, in ms
-- ARGV[3]      ttl (s) of the requeued task's record
-- ARGV[4]      msgpack array of {entry, name} maps: dead-letter entry id, task name
--              ('' when unknown)
-- Returns      {entry_id, ...} of the entries requeued (missing ids are skipped)

begin(KEYS)
local dead = KEYS[3]
local fallback = KEYS[4]
local queue = ARGV[1]
local now_ms = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local todo = unpack_arg(ARGV[4])

local function target(f)
  local s = f.stream
  -- Only a stream of this namespace and queue: the field came from a stream entry.
  for p = 0, 9 do
    if s == K.stream(queue, p) then return s end
  end
  return fallback
end

local function reset(id, name, entry_id, stream)
  local tkey = K.task(id)
  redis.call('HDEL', tkey, 'result', 'ct', 'exc_type', 'exc_message', 'traceback',
    'finished_at', 'started_at', 'worker', 'failed_task_id')
  redis.call('HSET', tkey, 'state', 'PENDING', 'queue', queue, 'enqueued_at', now_ms,
    '_e', entry_id, '_st', stream)
  if name ~= '' and redis.call('HEXISTS', tkey, 'name') == 0 then
    redis.call('HSET', tkey, 'name', name)
  end
  redis.call('PEXPIRE', tkey, ttl * 1000)
  notify(id, 'PENDING')
  journal('PENDING', id, '', queue)
end

local out = {}
for _, item in ipairs(todo) do
  local f = entry_fields(dead, item.entry)
  if f then
    local stream = target(f)
    local cmd = {'XADD', stream, '*'}
    for _, k in ipairs(ENTRY_FIELDS) do
      if f[k] then
        cmd[#cmd + 1] = k
        cmd[#cmd + 1] = f[k]
      end
    end
    -- Without a payload there is nothing to run (a delayed task's unreadable record,
    -- kept for a look): it stays dead.
    if f.m then
      -- A stream deleted meanwhile comes back with its group, reading from the start.
      redis.pcall('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
      local new_id = redis.call(unpack(cmd))
      if f.id then reset(f.id, item.name or '', new_id, stream) end
      redis.call('XDEL', dead, item.entry)
      out[#out + 1] = item.entry
    end
  end
end
flush_journal(now_ms)
return out
