-- revoke: make sure a task never runs. A scheduled task leaves the delayed zset, and a
-- queued one's entry is deleted from its stream (a worker that already read it finds the
-- task REVOKED); either is settled now. A running one is marked `revoked_at`: its run
-- goes on (unless the caller broadcasts a terminate) and ends REVOKED, never retried.
-- An unknown id (not sent yet) reads REVOKED and its first send is dropped. Final states
-- are left alone.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- ARGV[1]      task id
-- ARGV[2]      now, in ms
-- ARGV[3]      ttl (s) of the revocation
-- Returns      the state before the call ('' when unknown)

begin(KEYS)
local id = ARGV[1]
local now_ms = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])

local tkey = K.task(id)
local h = redis.call('HMGET', tkey, 'state', '_rec', '_e', '_st')
local state = h[1]
if state and FINAL[state] then return state end
if state == 'SCHEDULED' then
  redis.call('ZREM', K.delayed(), id)
  local t = read_record(h[2]) or {}
  settle_unrun(id, 'REVOKED', nil, nil, t.cid, t.cix, t.tail, ttl, now_ms)
  flush_journal(now_ms)
  return state
end
if state == 'PENDING' and h[3] and h[3] ~= '' and h[4] then
  local f = entry_fields(h[4], h[3])
  if f then
    -- Still in its stream (no worker has it): delete it and settle what waits on it.
    ack(h[4], h[3])
    settle_unrun(id, 'REVOKED', nil, nil, f.cid, f.cix, f.tail, ttl, now_ms)
    flush_journal(now_ms)
    return state
  end
end
if state == 'STARTED' then
  redis.call('HSET', tkey, 'revoked_at', now_ms)
  return state
end
redis.call('HSET', tkey, 'state', 'REVOKED', 'finished_at', now_ms)
-- An id not sent yet (a frozen signature, a step its canvas has not reached): its first
-- send is dropped, settling what waits on it (enqueue_task).
if not state then redis.call('HSET', tkey, '_unsent', 1) end
redis.call('HDEL', tkey, '_replaced', '_eb', '_e', '_st')
redis.call('PEXPIRE', tkey, ttl * 1000)
notify(id, 'REVOKED')
journal('REVOKED', id)
flush_journal(now_ms)
return state or ''
