-- purge: delete the waiting tasks of one queue, in chunks. Entries a worker is running
-- (pending in the group) are left alone; every task deleted is settled REVOKED, so its
-- waiters, chord and chain do not hang.
--
-- KEYS[1]      key prefix (task hashes and the delayed zset derive from it)
-- KEYS[2..]    the queue's streams
-- ARGV[1]      group name
-- ARGV[2]      queue name
-- ARGV[3]      now, in ms
-- ARGV[4]      ttl (s) of the revoked task records
-- ARGV[5]      limit: most tasks to delete in this call
-- ARGV[6]      mode: 'streams' (entries up to ARGV[7]) or 'delayed' (one ZSCAN step)
-- ARGV[7]      streams: last entry id to delete (entries added after the purge began
--              stay); delayed: the ZSCAN cursor ('0' to start)
-- Returns      {deleted, next}: next is 1/0 (more to do) in 'streams' mode, the next
--              ZSCAN cursor ('0' = done) in 'delayed' mode

local prefix = KEYS[1]
local group = ARGV[1]
local queue = ARGV[2]
local now_ms = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local mode = ARGV[6]
local bound = ARGV[7]

local function running(stream)
  local ids = {}
  local summary = redis.pcall('XPENDING', stream, group)
  if type(summary) ~= 'table' or summary.err or tonumber(summary[1]) == 0 then
    return ids, 0
  end
  local n = tonumber(summary[1])
  for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', n)) do
    ids[p[1]] = true
  end
  return ids, n
end

local function purge_stream(stream, budget)
  local skip, n = running(stream)
  local deleted = 0
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', bound, 'COUNT', budget + n)) do
    if deleted >= budget then break end
    if not skip[entry[1]] then
      redis.call('XDEL', stream, entry[1])
      local f = fields_map(entry[2])
      if f['id'] then
        settle_unrun(prefix, f['id'], 'REVOKED', nil, nil, f['cid'], f['cix'], f['tail'], ttl,
          now_ms)
      end
      deleted = deleted + 1
    end
  end
  return deleted
end

if mode == 'streams' then
  local deleted = 0
  for k = 2, #KEYS do
    deleted = deleted + purge_stream(KEYS[k], limit - deleted)
    if deleted >= limit then return {deleted, 1} end
  end
  return {deleted, 0}
end

local res = redis.call('ZSCAN', prefix .. 'delayed', bound, 'COUNT', limit)
local deleted = 0
for i = 1, #res[2], 2 do
  local id = res[2][i]
  local h = redis.call('HMGET', prefix .. 't:' .. id, 'state', 'queue', '_cid', '_cix', '_tail')
  if h[1] == 'SCHEDULED' and h[2] == queue then
    redis.call('ZREM', prefix .. 'delayed', id)
    -- HMGET gives false for a missing field; the helpers expect nil.
    settle_unrun(prefix, id, 'REVOKED', nil, nil, h[3] or nil, h[4] or nil, h[5] or nil, ttl,
      now_ms)
    deleted = deleted + 1
  end
end
return {deleted, res[1]}
