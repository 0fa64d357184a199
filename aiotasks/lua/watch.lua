-- watch: mark a task as watched (`_w` in its hash) by someone subscribed to its own
-- channel. Scripts publish a task's STARTED and final state on that channel only when
-- it is marked, so a task nobody watches costs no PUBLISH. The watcher subscribes
-- first, then marks, then reads the hash: a change it was not told of, it reads.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- ARGV[1]      task id
-- ARGV[2]      seconds the mark keeps a hash that has no expiry yet (a task not sent)
-- Returns      1

begin(KEYS)
local tkey = K.task(ARGV[1])
local ttl_ms = tonumber(ARGV[2]) * 1000

redis.call('HSET', tkey, '_w', 1)
if redis.call('PTTL', tkey) < 0 then redis.call('PEXPIRE', tkey, ttl_ms) end
return 1
