-- forget: delete a finished task's record (its state and result). A task not finished
-- yet keeps it: its live entry, revoke marks and waiters need it, and it has no result
-- to forget yet. One script, so a new send of the id between a read and the delete
-- cannot lose its record.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- ARGV[1]      task id
-- Returns      1 when the record was deleted, 0 when the task is live or unknown

begin(KEYS)
local tkey = K.task(ARGV[1])
if LIVE[redis.call('HGET', tkey, 'state') or ''] then return 0 end
return redis.call('DEL', tkey)
