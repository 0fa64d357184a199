-- GENERATED from aiotasks/contract.py and keys.py; do not edit. Regenerate with
--   python -m aiotasks.contract --write
-- Every script takes the key prefix, e.g. '{aiotasks}:', as KEYS[1] and the guard
-- key (P .. 'guard', see keys.Keys.guard) as KEYS[2]; K.<kind>(...) builds a key or
-- channel name exactly as aiotasks.keys.Keys does in Python.
-- P: the key prefix, KEYS[1], set by begin() (_lib.lua) as every call starts.
local P
-- The publish command: scripts.py makes it SPUBLISH on a Cluster (sharded pub/sub).
local PUBLISH = 'PUBLISH'
local GROUP = 'workers'
local PROTOCOL = 2
local ENTRY_FIELDS = {'v', 'id', 'ct', 'm', 'exp', 'r', 'cid', 'cix', 'tail', 'err', 'sig'}
-- The built-in task gathering a group's results (contract.COLLECT).
local COLLECT = 'aiotasks.collect'
local K = {}
function K.stream(queue, priority) return P .. 'q:' .. queue .. ':' .. priority end
function K.task(id) return P .. 't:' .. id end
function K.done_channel(id) return P .. 'done:' .. id end
function K.reply_channel(client) return P .. 'reply:' .. client end
function K.delayed() return P .. 'delayed' end
function K.dead(queue) return P .. 'dead:' .. queue end
function K.chord(id) return P .. 'chord:' .. id end
function K.chord_results(id) return P .. 'chord:' .. id .. ':r' end
function K.queues() return P .. 'queues' end
function K.workers() return P .. 'workers' end
function K.worker(name) return P .. 'worker:' .. name end
function K.control_channel() return P .. 'control' end
function K.periodic() return P .. 'periodic' end
function K.periodic_tick(name, tick) return P .. 'tick:' .. name .. ':' .. tick end
function K.rate(name) return P .. 'rate:' .. name end
function K.meta() return P .. 'meta' end
function K.index_done() return P .. 'idx:done' end
function K.events() return P .. 'events' end
function K.slots(key) return P .. 'slots:' .. key end
function K.slot_waiters(key) return P .. 'slots:' .. key .. ':w' end
function K.slot_keys() return P .. 'slots' end
function K.paused() return P .. 'paused' end
function K.schedules() return P .. 'schedules' end
function K.debounce(key) return P .. 'debounce:' .. key end
function K.group(id) return P .. 'group:' .. id end
function K.guard() return P .. 'guard' end
