-- start: mark entries delivered by a blocking XREADGROUP as STARTED, settling those
-- that were revoked or expired meanwhile (as fetch.lua does for the entries it reads).
-- The worker runs only the entries this returns 1 for.
--
-- KEYS[1]      key prefix
-- KEYS[2..]    streams, as given to XREADGROUP
-- ARGV[1]      group name
-- ARGV[2]      now, in ms
-- ARGV[3]      worker name
-- ARGV[4]      default ttl (s) for tasks settled here
-- ARGV[5..]    8 values per entry: key_index, entry_id, task_id, exp_ms, r, cid, cix, tail
--              (empty string when absent)
-- Returns      {1 or 0 per entry}: 1 = run it, 0 = settled here

local prefix = KEYS[1]
local group = ARGV[1]
local now_ms = tonumber(ARGV[2])
local worker = ARGV[3]
local default_ttl = tonumber(ARGV[4])

local out = {}
for i = 5, #ARGV, 8 do
  local f = {id = ARGV[i + 2], exp = ARGV[i + 3], r = ARGV[i + 4], cid = ARGV[i + 5],
    cix = ARGV[i + 6], tail = ARGV[i + 7]}
  if f.id == '' then f.id = nil end
  local stream = KEYS[tonumber(ARGV[i])]
  local run = start_entry(prefix, stream, group, ARGV[i + 1], f, now_ms, worker, 1, default_ttl)
  out[#out + 1] = run and 1 or 0
end
return out
