-- release: give back entries a stopping worker read ahead but never began, so another
-- worker can take them at once instead of after the visibility timeout. Each entry is
-- copied to a new entry on its stream, then acked and deleted; its task goes back to
-- PENDING. An entry no longer pending for this consumer (reclaimed by another worker,
-- or settled) is left alone; one whose task ended meanwhile (a revoke) or that is stale
-- is dropped.
--
-- KEYS[1]      key prefix
-- KEYS[2..]    streams, as given to XREADGROUP
-- ARGV[1]      group name
-- ARGV[2]      consumer (this worker)
-- ARGV[3..]    pairs: key_index, entry_id
-- Returns      the number of entries given back to their streams

local prefix = KEYS[1]
local group = ARGV[1]
local consumer = ARGV[2]

local released = 0
for i = 3, #ARGV, 2 do
  local stream = KEYS[tonumber(ARGV[i])]
  local entry_id = ARGV[i + 1]
  if held_by(stream, group, entry_id, consumer) then
    local found = redis.call('XRANGE', stream, entry_id, entry_id)
    local keep = found[1] ~= nil
    local id, tkey
    if keep then
      id = fields_map(found[1][2])['id']
      if id then
        tkey = prefix .. 't:' .. id
        local h = redis.call('HMGET', tkey, 'state', '_e')
        -- Not a stale entry (see start_entry), and not a task that ended meanwhile. A
        -- task whose record expired while queued is still given back, as start_entry
        -- would still run it.
        keep = (not h[2] or h[2] == entry_id) and not FINAL[h[1]]
        if not h[1] then tkey = nil end
      end
    end
    if keep then
      local new_id = redis.call('XADD', stream, '*', unpack(found[1][2]))
      if tkey then
        redis.call('HSET', tkey, 'state', 'PENDING', '_e', new_id, '_st', stream)
        redis.call('HDEL', tkey, 'started_at', 'worker')
        redis.call('PUBLISH', prefix .. 'done:' .. id, 'PENDING')
      end
      released = released + 1
    end
    redis.call('XACK', stream, group, entry_id)
    redis.call('XDEL', stream, entry_id)
  end
end
return released
