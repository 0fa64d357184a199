-- rate: a rate limit shared by every worker (GCRA). Each call reserves the next start
-- slot of one task name, one emission interval after the previous reservation, and
-- returns how long the caller must wait for it. A task over its limit is deferred to
-- its reserved slot, never dropped, and never blocks the worker meanwhile.
--
-- KEYS[1]      key prefix
-- KEYS[2]      the guard key (keys.Keys.guard: never written; makes a migrating slot refuse)
-- ARGV[1]      task name
-- ARGV[2]      emission interval, ms (1000 / rate per second)
-- ARGV[3]      now, in ms
-- Returns      ms to wait before starting (0 = start now)

begin(KEYS)
local key = K.rate(ARGV[1])
local interval = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])

local tat = tonumber(redis.call('GET', key) or now_ms)
if tat < now_ms then tat = now_ms end
redis.call('SET', key, tat + interval, 'PX', math.ceil(tat + interval - now_ms) + 1000)
return math.floor(tat - now_ms)
