-- release: give back entries a stopping worker read ahead but never began, so another
-- worker can take them at once instead of after the visibility timeout. Each entry is
-- copied to a new entry on its stream, then acked and deleted; its task goes back to
-- PENDING. An entry no longer pending for this consumer (reclaimed by another worker,
-- or settled) is left alone; one whose task ended meanwhile (a revoke) or that is stale
-- is dropped.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    streams, as given to XREADGROUP
-- ARGV[1]      consumer (this worker)
-- ARGV[2]      msgpack array of {stream, entry} maps
-- Returns      the number of entries given back to their streams

begin(KEYS)
local consumer = ARGV[1]
local refs = unpack_arg(ARGV[2])

local released = 0
for _, ref in ipairs(refs) do
  local stream, entry_id = ref.stream, ref.entry
  if held_by(stream, entry_id, consumer) then
    local f, flat = entry_fields(stream, entry_id)
    local keep = f ~= nil
    local tkey
    if keep and f.id then
      tkey = K.task(f.id)
      local h = redis.call('HMGET', tkey, 'state', '_e')
      -- Not a stale entry (see start_entry), and not a task that ended meanwhile. A
      -- task whose record expired while queued is still given back, as start_entry
      -- would still run it.
      keep = (not h[2] or h[2] == '' or h[2] == entry_id) and not FINAL[h[1]]
      if not h[1] then tkey = nil end
    end
    if keep then
      local new_id = redis.call('XADD', stream, '*', unpack(flat))
      if tkey then
        redis.call('HSET', tkey, 'state', 'PENDING', '_e', new_id, '_st', stream)
        redis.call('HDEL', tkey, 'started_at', 'worker')
        redis.call(PUBLISH, K.done_channel(f.id), 'PENDING')
      end
      released = released + 1
    end
    ack(stream, entry_id)
  end
end
return released
