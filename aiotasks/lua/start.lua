-- start: mark entries delivered by a blocking XREADGROUP as STARTED, by the same rules
-- as fetch.lua (start_entry), settling those revoked or expired meanwhile. The entry
-- fields are read here from the stream and returned with the entries to run, as
-- fetch.lua returns them.
--
-- KEYS[1]      key prefix
-- KEYS[2..]    streams, as given to XREADGROUP
-- ARGV[1]      now, in ms
-- ARGV[2]      worker name
-- ARGV[3]      default ttl (s) for tasks settled here
-- ARGV[4]      msgpack array of {stream, entry} maps
-- Returns      msgpack map {entries = {{stream, entry, fields = {name = value}}, ...}}:
--              the entries to run (the others were settled here, or are gone)

local now_ms = tonumber(ARGV[1])
local worker = ARGV[2]
local default_ttl = tonumber(ARGV[3])
local refs = unpack_arg(ARGV[4])

local entries = {}
for _, ref in ipairs(refs) do
  local f = entry_fields(ref.stream, ref.entry)
  if f and start_entry(ref.stream, ref.entry, f, now_ms, worker, 1, default_ttl) then
    entries[#entries + 1] = {stream = ref.stream, entry = ref.entry, fields = f}
  end
end
flush_journal(now_ms)
return reply({entries = entries})
