-- fetch: promote due delayed tasks, then read up to `count` new entries for this
-- consumer, most urgent stream first, and mark each one STARTED.
--
-- KEYS[1]      key prefix (task hashes and the delayed zset derive from it)
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    the streams to read, in priority order
-- ARGV[1]      consumer name
-- ARGV[2]      count: most entries to return
-- ARGV[3]      now, in ms
-- ARGV[4]      worker name recorded on started tasks
-- ARGV[5]      most delayed tasks to promote in this call
-- ARGV[6]      default ttl (s) for tasks settled here
-- ARGV[7]      '' or, when this call is pipelined behind a blocking XREADGROUP of this
--              consumer, the `tips` of the fetch before it (msgpack map): the entries that
--              read delivered are this consumer's pending ones past the tips, started
--              here first. `now` was taken before the wait: their ids (the time they
--              were added) bring it forward, or, when the read delivered nothing, its
--              timeout ARGV[8] (ms) does (a read that delivers nothing waits it out).
-- Returns      msgpack map {next_due = ms of the next delayed task or -1,
--              entries = {{stream, entry, {name, value, ...}}, ...}: each entry an array
--              with its fields flat, as XREADGROUP gave them (a Lua map per entry, and
--              packing it as one, cost Redis more than the worker pays to make the dict;
--              a plain array reply instead of msgpack cost it more still),
--              lost = {stream, ...}: streams whose group was gone and was recreated,
--              tips = {stream = id of its newest entry or '0-0'} when every stream was
--              read to its end: every entry delivered to this consumer so far is at or
--              below them, and the next call may wait for more (ARGV[7])}

begin(KEYS)
local consumer = ARGV[1]
local count = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local worker = ARGV[4]
local promote_limit = tonumber(ARGV[5])
local default_ttl = tonumber(ARGV[6])
local after_wait = ARGV[7]
local waited = tonumber(ARGV[8]) or 0

-- Each stream's length as this call found it (XLEN), for empty() and the tips, until
-- something may add to the streams (promote(), or settling an entry that does not run
-- after the wait: an errback, a chord's body).
local lengths = {}

local function promote()
  local due = redis.call('ZRANGEBYSCORE', K.delayed(), '-inf', txt(now_ms), 'LIMIT', '0',
    txt(promote_limit))
  if #due > 0 then lengths = {} end  -- it may add to them
  for _, id in ipairs(due) do
    redis.call('ZREM', K.delayed(), id)
    local tkey = K.task(id)
    local h = redis.call('HMGET', tkey, 'state', '_rec', 'enqueued_at', 'queue')
    if h[1] == 'SCHEDULED' then
      local t = read_record(h[2])
      if t then
        local ttl = redis.call('PTTL', tkey)
        redis.call('HDEL', tkey, '_rec', 'eta')
        -- enqueued_at stays the time it was sent, not the time it fell due.
        xadd_task(t, math.max(math.floor(ttl / 1000), 1), now_ms, h[3])
      else
        -- No readable record (written by aiotasks 0.1, or by hand): a dead letter of
        -- its queue (with the record as it was, for a look; it holds no entry to run
        -- again), and the task fails.
        local why = 'the scheduled task has no readable record (_rec): written by another version?'
        redis.call('XADD', K.dead(h[4] or 'default'), '*', 'id', id, '_rec', h[2] or '',
          'reason', 'DecodeError: ' .. why)
        settle_unrun(id, 'FAILURE', 'DecodeError', why, nil, nil, nil, default_ttl, now_ms)
      end
    end
  end
end

local lost = {}

-- Whether a stream exists. The first call asks about every stream at once: most of a
-- worker's streams (one per priority) are empty, and a call from Lua costs about as much
-- as a small command's own work (some 8k instructions), which matters most on an idle
-- worker, whose fetch runs between a send and its reply (it is pipelined behind the
-- blocking read the send wakes). (One XREAD for every stream's emptiness cost more than
-- an XLEN each: it walks the deleted entries at a stream's head.)
local all_exist
local function exists(stream)
  if all_exist == nil then
    all_exist = redis.call('EXISTS', unpack(KEYS, 3)) == #KEYS - 2
  end
  return all_exist or redis.call('EXISTS', stream) == 1
end

-- Whether a stream holds no entry at all (none new, none pending): XLEN costs a
-- fraction of an XREADGROUP. A stream that is gone is not empty here: its read finds
-- the group gone and says so.
local function empty(stream)
  local n = lengths[stream] or redis.call('XLEN', stream)
  lengths[stream] = n
  return n == 0 and exists(stream)
end

local function read(stream)
  local res = redis.pcall('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', txt(count),
    'STREAMS', stream, '>')
  if type(res) == 'table' and res.err then
    -- NOGROUP: the stream or its group is gone (the server lost its data, or someone
    -- deleted it). Recreate it, and say so: the worker reports the loss.
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
    lost[#lost + 1] = stream
    res = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', txt(count),
      'STREAMS', stream, '>')
  end
  return res
end

local entries = {}

-- The entries the blocking read delivered to this consumer (pending past the tips; the
-- entries it runs already are at or below them), all started: they are ours now.
-- XPENDING, not a history read, which would count a second delivery.
local function delivered(tips)
  local woken = {}
  for k = 3, #KEYS do
    local tip = tips[KEYS[k]]
    -- An empty stream holds nothing to run: an entry delivered and deleted since (a
    -- purge, a revoke) leaves the PEL at its reclaim.
    local n = tip and redis.call('XLEN', KEYS[k])
    lengths[KEYS[k]] = n
    local res = n and n > 0
      and redis.pcall('XPENDING', KEYS[k], GROUP, '(' .. tip, '+', '100', consumer)
    if type(res) == 'table' and not res.err then
      for _, p in ipairs(res) do
        woken[#woken + 1] = {KEYS[k], p[1]}
        local ms = tonumber(string.match(p[1], '^(%d+)'))
        if ms and ms > now_ms then now_ms = ms end
      end
    end
  end
  if #woken == 0 then now_ms = now_ms + waited end
  for _, w in ipairs(woken) do
    local stream, entry_id = w[1], w[2]
    local found = redis.call('XRANGE', stream, entry_id, entry_id)[1]
    if not found then
      ack(stream, entry_id)  -- deleted meanwhile (a purge, a revoke): nothing to run
    elseif start_entry(stream, entry_id, found[2], now_ms, worker, 1, default_ttl) then
      entries[#entries + 1] = {stream, entry_id, found[2]}
      count = count - 1
    else
      lengths = {}  -- settled here: what depends on it may have been enqueued
    end
  end
end

if after_wait ~= '' then delivered(unpack_arg(after_wait)) end
promote()
-- Whether every stream was read to its end: then the next call can be a blocking wait.
local drained = true
for k = 3, #KEYS do
  if count <= 0 then
    drained = false
    break
  end
  local asked = count
  local res = not empty(KEYS[k]) and read(KEYS[k])
  if res and #res[1][2] >= asked then drained = false end
  if res then
    for _, e in ipairs(res[1][2]) do
      if start_entry(KEYS[k], e[1], e[2], now_ms, worker, 1, default_ttl) then
        entries[#entries + 1] = {KEYS[k], e[1], e[2]}
        count = count - 1
      end
    end
  end
end
local tips = nil
if drained then
  tips = {}
  for k = 3, #KEYS do
    -- Every stream was looked at (drained), so empty() recorded each one's length, and
    -- nothing forgets them after the wait's settling. An entry this call added since
    -- (settling one that did not run) is past its tip: the next wait returns it at once.
    local newest = lengths[KEYS[k]] > 0
      and redis.call('XREVRANGE', KEYS[k], '+', '-', 'COUNT', '1')
    tips[KEYS[k]] = newest and newest[1] and newest[1][1] or '0-0'
  end
end
local nxt = redis.call('ZRANGE', K.delayed(), '0', '0', 'WITHSCORES')
flush_journal(now_ms)
return reply({next_due = tonumber(nxt[2]) or -1, entries = entries, lost = lost, tips = tips})
