-- purge: delete the waiting tasks of one queue, in chunks. Entries a worker is running
-- (pending in the group) are left alone; every task deleted is settled REVOKED, so its
-- waiters, chord and chain do not hang.
--
-- KEYS[1]      key prefix (task hashes and the delayed zset derive from it)
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    the queue's streams
-- ARGV[1]      queue name
-- ARGV[2]      now, in ms
-- ARGV[3]      ttl (s) of the revoked task records
-- ARGV[4]      limit: most tasks to delete in this call
-- ARGV[5]      mode: 'streams' (entries up to ARGV[6]) or 'delayed' (one ZSCAN step)
-- ARGV[6]      streams: msgpack map of stream -> last entry id to delete (entries added
--              after the purge began stay; a stream not in it is skipped); delayed: the
--              ZSCAN cursor ('0' to start)
-- Returns      msgpack map {deleted = n, next = ...}: next is '1'/'0' (more to do) in
--              'streams' mode, the next ZSCAN cursor ('0' = done) in 'delayed' mode

begin(KEYS)
local queue = ARGV[1]
local now_ms = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local mode = ARGV[5]
local bound = ARGV[6]

local function running(stream)
  local ids = {}
  local summary = redis.pcall('XPENDING', stream, GROUP)
  if type(summary) ~= 'table' or summary.err or tonumber(summary[1]) == 0 then
    return ids, 0
  end
  local n = tonumber(summary[1])
  for _, p in ipairs(redis.call('XPENDING', stream, GROUP, '-', '+', n)) do
    ids[p[1]] = true
  end
  return ids, n
end

local function purge_stream(stream, budget, last)
  if not last then return 0 end
  local skip, n = running(stream)
  local deleted = 0
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', last, 'COUNT', budget + n)) do
    if deleted >= budget then break end
    if not skip[entry[1]] then
      redis.call('XDEL', stream, entry[1])
      local f = fields_map(entry[2])
      if f.id then
        settle_unrun(f.id, 'REVOKED', nil, nil, f.cid, f.cix, f.tail, ttl, now_ms)
      end
      deleted = deleted + 1
    end
  end
  return deleted
end

if mode == 'streams' then
  local bounds = unpack_arg(bound)
  local deleted = 0
  for k = 3, #KEYS do
    deleted = deleted + purge_stream(KEYS[k], limit - deleted, bounds[KEYS[k]])
    if deleted >= limit then
      flush_journal(now_ms)
      return reply({deleted = deleted, next = '1'})
    end
  end
  flush_journal(now_ms)
  return reply({deleted = deleted, next = '0'})
end

local res = redis.call('ZSCAN', K.delayed(), bound, 'COUNT', limit)
local deleted = 0
for i = 1, #res[2], 2 do
  local id = res[2][i]
  local h = redis.call('HMGET', K.task(id), 'state', 'queue', '_rec')
  if h[1] == 'SCHEDULED' and h[2] == queue then
    redis.call('ZREM', K.delayed(), id)
    local t = read_record(h[3]) or {}
    settle_unrun(id, 'REVOKED', nil, nil, t.cid, t.cix, t.tail, ttl, now_ms)
    deleted = deleted + 1
  end
end
flush_journal(now_ms)
return reply({deleted = deleted, next = res[1]})
