-- acquire: take a concurrency slot of a key for each of a batch of tasks about to run,
-- under the key's limit. A task that holds its slot already (reserved when it was woken,
-- or a redelivery) keeps it, with its lease renewed. Leases of dead holders have ended
-- and no longer count.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- ARGV[1]      now, in ms
-- ARGV[2]      msgpack array of {key, limit, id, lease} maps (lease: ms)
-- Returns      {1 or 0 per request}: 1 = the slot is held, 0 = the key is at its limit

begin(KEYS)
local now_ms = tonumber(ARGV[1])
local requests = unpack_arg(ARGV[2])

local out = {}
for _, r in ipairs(requests) do
  local sk = K.slots(r.key)
  redis.call('ZREMRANGEBYSCORE', sk, '-inf', now_ms)
  local held = redis.call('ZSCORE', sk, r.id)
  if held or redis.call('ZCARD', sk) < tonumber(r.limit) then
    redis.call('ZADD', sk, now_ms + r.lease, r.id)
    redis.call('PEXPIRE', sk, r.lease + 60000)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
