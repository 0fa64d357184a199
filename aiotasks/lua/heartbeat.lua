-- heartbeat: keep this consumer's running entries fresh so no other worker reclaims
-- them, however long they run. Only the ids the worker is actually running are
-- refreshed: an entry it never received (a lost XREADGROUP reply) goes idle and is
-- reclaimed by someone.
--
-- KEYS[1]      key prefix (unused; every stream script takes it first)
-- KEYS[2..]    streams
-- ARGV[1]      group name
-- ARGV[2]      consumer name
-- ARGV[3..]    pairs: key_index, entry_id
-- Returns      number of entries refreshed

local group = ARGV[1]
local consumer = ARGV[2]

local refreshed = 0
for i = 3, #ARGV, 2 do
  local stream = KEYS[tonumber(ARGV[i])]
  local entry_id = ARGV[i + 1]
  -- Re-claim only what is still ours: an entry another worker took over stays theirs.
  if held_by(stream, group, entry_id, consumer) then
    redis.call('XCLAIM', stream, group, consumer, 0, entry_id, 'JUSTID')
    refreshed = refreshed + 1
  end
end
return refreshed
