-- reclaim: take over entries that a dead consumer left idle past the visibility
-- timeout (XAUTOCLAIM). An entry delivered more than max_deliveries times goes to its
-- queue's dead-letter stream and its task ends FAILURE instead of looping forever.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    streams to reclaim from
-- ARGV[1]      consumer name (the new owner)
-- ARGV[2]      min idle time, ms (the visibility timeout)
-- ARGV[3]      count: most entries to return
-- ARGV[4]      now, in ms
-- ARGV[5]      worker name recorded on started tasks
-- ARGV[6]      max deliveries
-- ARGV[7]      default ttl (s) for tasks settled here
-- ARGV[8]      msgpack map of stream key -> queue name, for dead letters
-- Returns      msgpack map {entries = {{stream, entry, fields, deliveries}, ...}}

local consumer = ARGV[1]
local min_idle = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local now_ms = tonumber(ARGV[4])
local worker = ARGV[5]
local max_deliveries = tonumber(ARGV[6])
local default_ttl = tonumber(ARGV[7])
local queue_of = unpack_arg(ARGV[8])

local entries = {}
for k = 3, #KEYS do
  if count <= 0 then break end
  local stream = KEYS[k]
  local cursor = '0-0'
  for _ = 1, 10 do
    local res = redis.pcall('XAUTOCLAIM', stream, GROUP, consumer, min_idle, cursor,
      'COUNT', count)
    if type(res) ~= 'table' or res.err then break end
    cursor = res[1]
    for _, e in ipairs(res[2]) do
      local entry_id = e[1]
      local p = redis.call('XPENDING', stream, GROUP, entry_id, entry_id, 1)
      local deliveries = p[1] and tonumber(p[1][4]) or 1
      local f = fields_map(e[2])
      if deliveries > max_deliveries then
        dead_letter(stream, entry_id, e[2], f, queue_of[stream] or 'default',
          'MaxDeliveriesExceeded', 'delivered ' .. deliveries
            .. ' times without finishing (max_deliveries=' .. max_deliveries
            .. '): the worker died or stalled each time', default_ttl, now_ms)
      elseif start_entry(stream, entry_id, f, now_ms, worker, deliveries, default_ttl) then
        entries[#entries + 1] = {stream = stream, entry = entry_id, fields = f,
          deliveries = deliveries}
        count = count - 1
      end
    end
    if cursor == '0-0' or count <= 0 then break end
  end
end
-- Keys whose waiters no release will wake (their slot holders died): their leases have
-- ended, so the waiters go now.
for _, key in ipairs(redis.call('SRANDMEMBER', K.slot_keys(), 20)) do
  local first = read_record(redis.call('LINDEX', K.slot_waiters(key), 0))
  if first then
    wake(key, tonumber(first.limit), now_ms, tonumber(first.lease))
  else
    redis.call('SREM', K.slot_keys(), key)
  end
end
flush_journal(now_ms)
return reply({entries = entries})
