-- reclaim: take over entries that a dead consumer left idle past the visibility
-- timeout. An entry delivered more than max_deliveries times goes to its
-- queue's dead-letter stream and its task ends FAILURE instead of looping forever.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- KEYS[3..]    streams to reclaim from
-- ARGV[1]      consumer name (the new owner)
-- ARGV[2]      min idle time, ms (the visibility timeout)
-- ARGV[3]      count: most entries to return
-- ARGV[4]      now, in ms
-- ARGV[5]      worker name recorded on started tasks
-- ARGV[6]      max deliveries
-- ARGV[7]      default ttl (s) for tasks settled here
-- ARGV[8]      msgpack map of stream key -> queue name, for dead letters
-- ARGV[9]      alone_from: the delivery from which an entry runs alone (its workers died
--              with it twice: it may be what kills them, and must not take the tasks
--              running beside it along); 0: never
-- ARGV[10]     '1' when the caller runs nothing now: it may take one such entry, which is
--              then all this call claims (the caller runs nothing else beside it)
-- Returns      msgpack map {entries = {{stream, entry, fields, deliveries, alone?}, ...},
--              waiting = entries left idle because they run alone (for an idle worker)}

begin(KEYS)
local consumer = ARGV[1]
local min_idle = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local now_ms = tonumber(ARGV[4])
local worker = ARGV[5]
local max_deliveries = tonumber(ARGV[6])
local default_ttl = tonumber(ARGV[7])
local queue_of = unpack_arg(ARGV[8])

local alone_from = tonumber(ARGV[9]) or 0
local may_take_alone = ARGV[10] == '1'

-- XPENDING first, then XCLAIM one by one: a claim counts a delivery, so an entry that
-- must run alone is claimed only by a worker that will run it now, and alone.
local entries = {}
local waiting = 0
local took_alone = false

-- One idle pending entry: claim it (and start or dead-letter it), or leave it for an idle
-- worker when it runs alone.
local function consider(stream, p)
  local entry_id = p[1]
  local deliveries = tonumber(p[4]) + 1
  local alone = alone_from > 0 and deliveries >= alone_from and deliveries <= max_deliveries
  if alone and (not may_take_alone or #entries > 0) then
    waiting = waiting + 1
    return
  end
  local e = redis.call('XCLAIM', stream, GROUP, consumer, min_idle, entry_id)[1]
  if not e then
    -- Gone from the stream (deleted meanwhile): Redis 7 drops it from the PEL as it
    -- claims; 6.2 keeps it, pending for ever, unless acked.
    redis.call('XACK', stream, GROUP, entry_id)
    return
  end
  local f = fields_map(e[2])
  -- With the deliveries of the task's entries before this one (dl: it waited for a
  -- concurrency slot, and went back to its stream as a new entry).
  local all = deliveries + (tonumber(f.dl) or 0)
  if all > max_deliveries then
    dead_letter(stream, entry_id, e[2], f, queue_of[stream] or 'default',
      'MaxDeliveriesExceeded', 'delivered ' .. all
        .. ' times without finishing (max_deliveries=' .. max_deliveries
        .. '): the worker died or stalled each time', default_ttl, now_ms)
  elseif start_entry(stream, entry_id, e[2], now_ms, worker, deliveries, default_ttl) then
    entries[#entries + 1] = {stream = stream, entry = entry_id, fields = f,
      deliveries = deliveries, alone = alone and 1 or nil}
    count = count - 1
    took_alone = alone
  end
end

-- The idle pending entries a page at a time (entries left waiting must not hide the ones
-- behind them), at most PAGES pages per stream.
local PAGE, PAGES = 100, 10
for k = 3, #KEYS do
  local stream = KEYS[k]
  local start = '-'
  for _ = 1, PAGES do
    if count <= 0 or took_alone then break end
    local page = redis.pcall('XPENDING', stream, GROUP, 'IDLE', min_idle, start, '+', PAGE)
    if type(page) ~= 'table' or page.err or #page == 0 then break end
    for _, p in ipairs(page) do
      if count <= 0 or took_alone then break end
      consider(stream, p)
    end
    if #page < PAGE then break end
    start = '(' .. page[#page][1]
  end
end
-- Keys whose waiters no release will wake (their slot holders died): their leases have
-- ended, so the waiters go now.
for _, key in ipairs(redis.call('SRANDMEMBER', K.slot_keys(), 20)) do
  local first = read_record(redis.call('LINDEX', K.slot_waiters(key), 0))
  if first then
    wake(key, tonumber(first.limit), now_ms, tonumber(first.lease))
  else
    redis.call('SREM', K.slot_keys(), key)
  end
end
flush_journal(now_ms)
return reply({entries = entries, waiting = waiting})
