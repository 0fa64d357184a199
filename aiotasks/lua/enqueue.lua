-- enqueue: put a batch of tasks on their streams (or in the delayed zset when they are
-- due later), skipping ids that are already queued, scheduled or running (dedup).
--
-- KEYS[1]      key prefix
-- ARGV[1]      now, in ms
-- ARGV[2]      mode: 'send' (dedup live ids), 'follow' (skip ids that exist at all)
--              'retry' or 'defer' (the running task again, see _lib.lua)
-- ARGV[3]      msgpack array of tasks, each an array of 14 values: id, name, queue,
--              stream, payload, content_type, due_ms (0 = now), ttl_s, exp_ms, r, cid,
--              cix, tail, reply channel ('' when absent)
-- Returns      {1 or 0 per task}: 1 = enqueued, 0 = an existing task kept

local prefix = KEYS[1]
local now_ms = tonumber(ARGV[1])
local mode = ARGV[2]
local tasks = cmsgpack.unpack(ARGV[3])

local out = {}
local queues = {}
for _, t in ipairs(tasks) do
  out[#out + 1] = enqueue_task(prefix, mode, t, now_ms)
  queues[t[3]] = true
end
for q in pairs(queues) do
  redis.call('SADD', prefix .. 'queues', q)
end
return out
