-- heartbeat: keep this consumer's running entries fresh so no other worker reclaims
-- them, however long they run. Only the ids the worker is actually running are
-- refreshed: an entry it never received (a lost XREADGROUP reply) goes idle and is
-- reclaimed by someone.
--
-- The concurrency slot a running entry holds (`slot = {key, lease}` in its ref) gets
-- its lease renewed too, so only a dead holder's slot frees itself.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    streams
-- ARGV[1]      consumer name
-- ARGV[2]      msgpack array of {stream, entry, id?, slot?} maps
-- ARGV[3]      now, in ms
-- Returns      number of entries refreshed

begin(KEYS)
local consumer = ARGV[1]
local refs = unpack_arg(ARGV[2])
local now_ms = tonumber(ARGV[3])

local refreshed = 0
for _, ref in ipairs(refs) do
  -- Re-claim only what is still ours: an entry another worker took over stays theirs.
  if held_by(ref.stream, ref.entry, consumer) then
    redis.call('XCLAIM', ref.stream, GROUP, consumer, 0, ref.entry, 'JUSTID')
    if ref.slot then
      redis.call('ZADD', K.slots(ref.slot.key), 'XX', now_ms + ref.slot.lease, ref.id)
    end
    refreshed = refreshed + 1
  end
end
return refreshed
