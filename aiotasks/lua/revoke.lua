-- revoke: make sure a task never runs. A scheduled task leaves the delayed zset, and a
-- queued one's entry is deleted from its stream (a worker that already read it finds the
-- task REVOKED); either is settled now. A running one is marked REVOKED (the caller
-- broadcasts a terminate if asked). Final states are left alone.
--
-- KEYS[1]      key prefix
-- ARGV[1]      task id
-- ARGV[2]      now, in ms
-- ARGV[3]      ttl (s) of the revocation
-- Returns      the state before the call ('' when unknown)

local prefix = KEYS[1]
local id = ARGV[1]
local now_ms = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])

local tkey = prefix .. 't:' .. id
local h = redis.call('HMGET', tkey, 'state', '_cid', '_cix', '_tail', '_e', '_st')
local state = h[1]
if state and FINAL[state] then return state end
if state == 'SCHEDULED' then
  redis.call('ZREM', prefix .. 'delayed', id)
  settle_unrun(prefix, id, 'REVOKED', nil, nil, h[2], h[3], h[4], ttl, now_ms)
  return state
end
if state == 'PENDING' and h[5] and h[6] then
  local entry = redis.call('XRANGE', h[6], h[5], h[5])
  if entry[1] then
    -- Still in its stream (no worker has it): delete it and settle what waits on it.
    local f = fields_map(entry[1][2])
    redis.call('XDEL', h[6], h[5])
    redis.call('XACK', h[6], 'workers', h[5])
    settle_unrun(prefix, id, 'REVOKED', nil, nil, f['cid'], f['cix'], f['tail'], ttl, now_ms)
    return state
  end
end
redis.call('HSET', tkey, 'state', 'REVOKED', 'finished_at', now_ms)
redis.call('PEXPIRE', tkey, ttl * 1000)
notify(prefix, id, 'REVOKED')
return state or ''
