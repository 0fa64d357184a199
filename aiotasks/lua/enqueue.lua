-- enqueue: put a batch of tasks on their streams (or in the delayed zset when they are
-- due later), skipping ids that are already queued, scheduled or running (dedup).
--
-- KEYS[1]      key prefix, e.g. "{aiotasks}:"
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- ARGV[1]      now, in ms
-- ARGV[2]      mode: 'send' (dedup live ids), 'follow' (skip ids that exist at all),
--              'retry' or 'defer' (the running task again, see _lib.lua)
-- ARGV[3]      msgpack array of task records (maps: v, id, name, queue, priority, m,
--              ct, ttl, and optionally due, delay, exp, r, cid, cix, tail, reply, eb;
--              see docs/protocol.md)
-- Returns      {1 or 0 per task}: 1 = enqueued, 0 = an existing task kept; an error
--              reply, with nothing enqueued, when the mode or a record is outside the
--              contract (record_problem)

begin(KEYS)
local now_ms = tonumber(ARGV[1])
local mode = ARGV[2]
local tasks = unpack_arg(ARGV[3])
if not MODES[mode] then
  return redis.error_reply("enqueue.lua: unknown mode '" .. tostring(mode) .. "' (send, follow, retry or defer)")
end
local good_queues = {}
for i, t in ipairs(tasks) do
  local problem = record_problem(t, good_queues)
  if problem then
    return redis.error_reply('enqueue.lua: record ' .. i .. ': ' .. problem .. ' (nothing enqueued)')
  end
end

local out = {}
local queues = {}
for _, t in ipairs(tasks) do
  out[#out + 1] = enqueue_task(mode, t, now_ms)
  queues[t.queue] = true
end
for q in pairs(queues) do
  redis.call('SADD', K.queues(), q)
end
flush_journal(now_ms)
return out
