-- reclaim: take over entries that a dead consumer left idle past the visibility
-- timeout (XAUTOCLAIM). An entry delivered more than max_deliveries times goes to its
-- queue's dead-letter stream and its task ends FAILURE instead of looping forever.
--
-- KEYS[1]      key prefix
-- KEYS[2..]    streams to reclaim from
-- ARGV[1]      group name
-- ARGV[2]      consumer name (the new owner)
-- ARGV[3]      min idle time, ms (the visibility timeout)
-- ARGV[4]      count: most entries to return
-- ARGV[5]      now, in ms
-- ARGV[6]      worker name recorded on started tasks
-- ARGV[7]      max deliveries
-- ARGV[8]      default ttl (s) for tasks settled here
-- Returns      {key_index, entry_id, {field, value, ...}, deliveries, ...}

local prefix = KEYS[1]
local group = ARGV[1]
local consumer = ARGV[2]
local min_idle = tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local now_ms = tonumber(ARGV[5])
local worker = ARGV[6]
local max_deliveries = tonumber(ARGV[7])
local default_ttl = tonumber(ARGV[8])

local function dead_letter(stream, entry_id, flat, f, deliveries)
  local queue = string.match(stream, '^.*:q:(.*):%d$') or 'default'
  local cmd = {'XADD', prefix .. 'dead:' .. queue, '*'}
  for i = 1, #flat do cmd[#cmd + 1] = flat[i] end
  cmd[#cmd + 1] = 'reason'
  cmd[#cmd + 1] = 'delivered ' .. deliveries .. ' times (max_deliveries=' .. max_deliveries .. ')'
  cmd[#cmd + 1] = 'stream'
  cmd[#cmd + 1] = stream
  redis.call(unpack(cmd))
  redis.call('XACK', stream, group, entry_id)
  redis.call('XDEL', stream, entry_id)
  if f['id'] then
    settle_unrun(prefix, f['id'], 'FAILURE', 'MaxDeliveriesExceeded',
      'delivered ' .. deliveries .. ' times without finishing (the worker died each time?)',
      f['cid'], f['cix'], f['tail'], default_ttl, now_ms)
  end
end

local out = {}
for k = 2, #KEYS do
  if count <= 0 then break end
  local stream = KEYS[k]
  local cursor = '0-0'
  for _ = 1, 10 do
    local res = redis.pcall('XAUTOCLAIM', stream, group, consumer, min_idle, cursor,
      'COUNT', count)
    if type(res) ~= 'table' or res.err then break end
    cursor = res[1]
    for _, entry in ipairs(res[2]) do
      local entry_id = entry[1]
      local p = redis.call('XPENDING', stream, group, entry_id, entry_id, 1)
      local deliveries = p[1] and tonumber(p[1][4]) or 1
      local f = fields_map(entry[2])
      if deliveries > max_deliveries then
        dead_letter(stream, entry_id, entry[2], f, deliveries)
      elseif start_entry(prefix, stream, group, entry_id, f, now_ms, worker, deliveries,
          default_ttl) then
        out[#out + 1] = k
        out[#out + 1] = entry_id
        out[#out + 1] = entry[2]
        out[#out + 1] = deliveries
        count = count - 1
      end
    end
    if cursor == '0-0' or count <= 0 then break end
  end
end
return out
