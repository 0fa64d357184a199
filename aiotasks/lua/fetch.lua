-- fetch: promote due delayed tasks, then read up to `count` new entries for this
-- consumer, most urgent stream first, and mark each one STARTED.
--
-- KEYS[1]      key prefix, e.g. "{aiotasks}:" (task hashes and the delayed zset derive from it)
-- KEYS[2..]    the streams to read, in priority order
-- ARGV[1]      group name
-- ARGV[2]      consumer name
-- ARGV[3]      count: most entries to return
-- ARGV[4]      now, in ms
-- ARGV[5]      worker name recorded on started tasks
-- ARGV[6]      most delayed tasks to promote in this call
-- ARGV[7]      default ttl (s) for tasks settled here
-- Returns      {next_due_ms or -1, key_index, entry_id, {field, value, ...}, ...}
--              where key_index is the position of the entry's stream in KEYS.

local prefix = KEYS[1]
local group = ARGV[1]
local consumer = ARGV[2]
local count = tonumber(ARGV[3])
local now_ms = tonumber(ARGV[4])
local worker = ARGV[5]
local promote_limit = tonumber(ARGV[6])
local default_ttl = tonumber(ARGV[7])

local function promote()
  local due = redis.call('ZRANGEBYSCORE', prefix .. 'delayed', '-inf', now_ms,
    'LIMIT', 0, promote_limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', prefix .. 'delayed', id)
    local tkey = prefix .. 't:' .. id
    local h = redis.call('HMGET', tkey, 'state', 'name', 'queue', '_s', '_m', '_ct', '_exp',
      '_r', '_cid', '_cix', '_tail', 'enqueued_at')
    if h[1] == 'SCHEDULED' and h[5] then
      local ttl = redis.call('PTTL', tkey)
      redis.call('HDEL', tkey, '_s', '_m', '_ct', '_exp', '_r', '_cid', '_cix', '_tail', 'eta')
      xadd_task(prefix, h[4], id, h[2], h[3], h[5], h[6],
        {'exp', h[7] or '', 'r', h[8] or '', 'cid', h[9] or '', 'cix', h[10] or '',
          'tail', h[11] or ''},
        math.max(math.floor(ttl / 1000), 1), now_ms)
      -- enqueued_at stays the time it was sent, not the time it fell due.
      redis.call('HSET', tkey, 'enqueued_at', h[12] or now_ms)
    end
  end
end

local function read(stream)
  local res = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
    'STREAMS', stream, '>')
  if type(res) == 'table' and res.err then
    -- NOGROUP: the stream or its group is gone (purged, or the server lost its data).
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
      'STREAMS', stream, '>')
  end
  return res
end

promote()
local out = {-1}
for k = 2, #KEYS do
  if count <= 0 then break end
  local res = read(KEYS[k])
  if res then
    for _, entry in ipairs(res[1][2]) do
      local f = fields_map(entry[2])
      if start_entry(prefix, KEYS[k], group, entry[1], f, now_ms, worker, 1, default_ttl) then
        out[#out + 1] = k
        out[#out + 1] = entry[1]
        out[#out + 1] = entry[2]
        count = count - 1
      end
    end
  end
end
local nxt = redis.call('ZRANGE', prefix .. 'delayed', 0, 0, 'WITHSCORES')
if nxt[2] then out[1] = tonumber(nxt[2]) end
return out
