-- Shared helpers. scripts.py prepends _contract.lua (key builders K.*, PROTOCOL,
-- ENTRY_FIELDS) and this file to every other script, so each script stays one atomic
-- EVALSHA while the logic lives in one place.
--
-- Records and ops arrive as msgpack maps (aiotasks/contract.py) and are read by field
-- name. A task record `t`: v, id, name, queue, priority, m, ct, ttl, and optionally
-- due, delay, exp, r, cid, cix, tail, reply (record_problem checks what a caller
-- sends). Every key is built by K.* from P.

local FINAL = {SUCCESS = true, FAILURE = true, REVOKED = true}
local LIVE = {PENDING = true, SCHEDULED = true, STARTED = true}

-- One msgpack argument, unpacked: a record, an op or a batch of them.
local function unpack_arg(packed)
  local value = cmsgpack.unpack(packed)
  if type(value) ~= 'table' then
    error('aiotasks: expected a msgpack map or array argument')
  end
  return value
end

-- What is wrong with a task record a caller sent (docs/protocol.md section 5), or nil:
-- what would strand it (a priority or queue no worker reads) or break the call halfway
-- with a Lua error, checked before anything is written. Every record of every send
-- passes here, and each Lua function call costs Redis about a thousand instructions,
-- so it makes few: what a worker refuses by itself when it reads the entry (a missing
-- payload, a bad `cid`) is left to it. aiotasks' own records always pass.
local MODES = {send = true, follow = true, retry = true, defer = true}
local PRIORITIES = {[0] = true, true, true, true, true, true, true, true, true, true}

-- `queues`: the queue names found good so far in this call (a batch names few).
local function record_problem(t, queues)
  if type(t) ~= 'table' then return 'not a map' end
  if t.v ~= PROTOCOL then return "'v' must be " .. PROTOCOL end
  local id, name, q, ttl = t.id, t.name, t.queue, t.ttl
  if type(id) ~= 'string' or id == '' then return "'id' must be a non-empty string" end
  if type(name) ~= 'string' or name == '' then return "'name' must be a non-empty string" end
  if type(t.m) ~= 'string' then return "'m' must be a (str-typed) byte string" end
  -- A queue name as a worker's --queues gives it: no comma, no surrounding space.
  if not queues[q] then
    if type(q) ~= 'string'
        or not (string.find(q, '^[^,%s][^,]*[^,%s]$') or string.find(q, '^[^,%s]$')) then
      return "'queue' must be a non-empty string without commas or surrounding spaces"
    end
    queues[q] = true
  end
  if not PRIORITIES[t.priority] then return "'priority' must be a whole number 0..9" end
  if type(ttl) ~= 'number' or ttl < 1 or ttl % 1 ~= 0 then
    return "'ttl' must be a whole number of seconds >= 1"
  end
  -- Read with tonumber(): a string there ran the task at once, without a word; NaN
  -- (x ~= x) too, and a number past 2^53 ms fails PEXPIRE halfway through the call.
  local due, delay = t.due, t.delay
  if (due ~= nil and (type(due) ~= 'number' or due ~= due or due > 2^53 or due < -2^53))
      or (delay ~= nil and (type(delay) ~= 'number' or delay ~= delay or delay > 2^53
        or delay < -2^53)) then
    return "'due' and 'delay' must be numbers of ms"
  end
  if t.eb ~= nil then
    if type(t.eb) ~= 'table' then return "'eb' must be an array of task records" end
    for i, rec in ipairs(t.eb) do
      local problem = record_problem(rec, queues)
      if problem then return 'errback ' .. i .. ': ' .. problem end
    end
  end
  return nil
end

-- A task record stored by a script (`_rec`, a chord's `body`/`on_error`, `_eb`), or nil
-- when it is missing or unreadable (written by another version, or by hand).
local function read_record(packed)
  if not packed then return nil end
  local ok, value = pcall(cmsgpack.unpack, packed)
  if ok and type(value) == 'table' then return value end
  return nil
end

-- `out` with the name/value pairs of `flat` appended, but those named `a` or `b`.
local function flat_without(flat, a, b, out)
  for i = 1, #flat, 2 do
    if flat[i] ~= a and flat[i] ~= b then
      out[#out + 1] = flat[i]
      out[#out + 1] = flat[i + 1]
    end
  end
  return out
end

-- The values of up to seven fields, named k1..k7, in flat[a..b] (name, value, ...), in that
-- order (nil when absent): one pass over the array as XREADGROUP or an op gives it, where
-- a map would cost a Lua table, grown and rehashed field by field, per entry or op.
local function pick(flat, a, b, k1, k2, k3, k4, k5, k6, k7)
  local v1, v2, v3, v4, v5, v6, v7
  for i = a, b, 2 do
    local k = flat[i]
    if k == k1 then v1 = flat[i + 1]
    elseif k == k2 then v2 = flat[i + 1]
    elseif k == k3 then v3 = flat[i + 1]
    elseif k == k4 then v4 = flat[i + 1]
    elseif k == k5 then v5 = flat[i + 1]
    elseif k == k6 then v6 = flat[i + 1]
    elseif k == k7 then v7 = flat[i + 1]
    end
  end
  return v1, v2, v3, v4, v5, v6, v7
end

-- redis.call writes a number argument with snprintf('%.17g'), about 3k instructions
-- each; the numbers the hot path passes (now, a ttl in ms, a priority, a count) repeat
-- within a call, so each integer's text is made once per call. Anything else is passed
-- as it is.
local TXT  -- number -> text; begin() empties it

local function txt(n)
  if type(n) ~= 'number' then return n end
  local s = TXT[n]
  if s == nil then
    -- '%.0f', not '%d': Lua's '%d' casts to a C long, 32 bits on some builds.
    s = n % 1 == 0 and string.format('%.0f', n) or n
    TXT[n] = s
  end
  return s
end

local function fields_map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

-- The task index and the event feed: every state change a script makes is journaled
-- here, then written by flush_journal() once per script call, so they cost a few
-- commands per batch, not per task. The caps live in the namespace's meta hash
-- (0 turns either off).
local DEFAULT_CAP = 10000
local DEFAULT_EVENTS_CAP = 1000

-- The caps, read once per script call, on its first event (nil: not read yet).
local CAPS

-- What the journal holds until flush_journal(): the feed's event lines and the index's
-- finished ids.
local LINES, FINISHED  -- lists; begin() makes them

-- A state change of task `id` (with its name and queue when it is sent): an event line
-- "state<TAB>id[<TAB>name<TAB>queue]" for the feed, as cheap to build here as a string
-- gets and as easy to read, and a finished id for the index.
local function journal(state, id, name, queue)
  if CAPS == nil then
    local conf = redis.call('HMGET', K.meta(), 'index_cap', 'events_cap')
    CAPS = {tonumber(conf[1]) or DEFAULT_CAP, tonumber(conf[2]) or DEFAULT_EVENTS_CAP}
  end
  if CAPS[2] > 0 then
    LINES[#LINES + 1] = name and (state .. '\t' .. id .. '\t' .. name .. '\t' .. queue)
      or (state .. '\t' .. id)
  end
  if CAPS[1] > 0 and FINAL[state] then FINISHED[#FINISHED + 1] = id end
end

-- A command with many members, in chunks that Lua's unpack can take.
local function call_chunked(cmd, key, items)
  for i = 1, #items, 1000 do
    local args = {cmd, key}
    for j = i, math.min(i + 999, #items) do args[#args + 1] = items[j] end
    redis.call(unpack(args))
  end
end

-- Finished tasks go to the index (unfinished ones are found where they wait: streams
-- and the delayed set), trimmed to the newest `cap`.
local function index_tasks(cap, now_ms)
  local scored, score = {}, txt(now_ms)
  for _, id in ipairs(FINISHED) do
    scored[#scored + 1] = score
    scored[#scored + 1] = id
  end
  call_chunked('ZADD', K.index_done(), scored)
  local over = redis.call('ZCARD', K.index_done()) - cap
  if over > 0 then redis.call('ZREMRANGEBYRANK', K.index_done(), '0', txt(over - 1)) end
end

-- Events go to the feed in entries of at most EVENTS_PER_ENTRY, and the feed keeps about
-- events_cap entries: its memory is bounded however large the batches are.
local EVENTS_PER_ENTRY = 100

local function feed_events(cap, now_ms)
  for i = 1, #LINES, EVENTS_PER_ENTRY do
    redis.call('XADD', K.events(), 'MAXLEN', '~', cap, '*', 't', txt(now_ms),
      'e', table.concat(LINES, '\n', i, math.min(i + EVENTS_PER_ENTRY - 1, #LINES)))
  end
end

local function flush_journal(now_ms)
  if #FINISHED > 0 then index_tasks(CAPS[1], now_ms) end
  if #LINES > 0 then feed_events(CAPS[2], now_ms) end
  LINES, FINISHED = {}, {}
end

-- Append `value` to the list at map[key], creating it.
local function push(map, key, value)
  local list = map[key]
  if not list then
    list = {}
    map[key] = list
  end
  list[#list + 1] = value
end

-- Final states for reply channels, by channel, when a script batches them (finish.lua):
-- one PUBLISH per sender per batch instead of one per task.
local REPLIES

-- One final state as a reply channel message: "<id>\n<state>[\n<ct>\n<result>]".
local function reply_text(id, state, ct, result)
  local msg = id .. '\n' .. state
  if ct and result then msg = msg .. '\n' .. ct .. '\n' .. result end
  return msg
end

-- Wake whoever waits on a task: its own channel carries the state (for updates() and
-- handles of other processes); the reply channel of the process that sent it (stored in
-- the task hash) carries the final state, and the encoded result, to result() waiters.
-- `reply`: the hash's reply field when the caller has read it already (false: none);
-- `watched`: its watch mark (`_w`, see watch.lua) when read (false: nobody watches, so
-- the task's own channel is skipped; nil: not read, so it is published).
local function notify(id, state, ct, result, reply, watched)
  if watched ~= false then redis.call(PUBLISH, K.done_channel(id), state) end
  if reply == nil then reply = redis.call('HGET', K.task(id), 'reply') end
  if not reply then return end
  if REPLIES then
    push(REPLIES, reply, (ct and result) and {id, state, ct, result} or {id, state})
  else
    redis.call(PUBLISH, reply, reply_text(id, state, ct, result))
  end
end

local function batch_replies()
  REPLIES = {}
end

-- One message per reply channel: a single final state as reply_text() makes it, several
-- as "\n" + a msgpack array of {id, state[, ct, result]} (an id never holds a newline,
-- so the leading one tells the two apart).
local function flush_replies()
  local replies = REPLIES
  REPLIES = nil
  for channel, batch in pairs(replies or {}) do
    if #batch == 1 then
      local m = batch[1]
      redis.call(PUBLISH, channel, reply_text(m[1], m[2], m[3], m[4]))
    else
      redis.call(PUBLISH, channel, '\n' .. cmsgpack.pack(batch))
    end
  end
end

-- Whether an entry is pending for this consumer (delivered to it, not yet acked).
-- pcall: a stream that vanished (purged, or the server lost its data) has no group.
local function held_by(stream, entry_id, consumer)
  local p = redis.pcall('XPENDING', stream, GROUP, entry_id, entry_id, '1', consumer)
  return type(p) == 'table' and not p.err and p[1] ~= nil
end

-- Whether a record names a reply channel of this namespace (`P reply:<client>`). Any
-- other is ignored: on a Cluster it would hash to another slot, where this script's
-- SPUBLISH cannot reach, and fail the call.
local function own_reply(t)
  local r = t.reply
  return r ~= nil and r ~= '' and string.sub(r, 1, #P) == P
end

-- Put a ready task record on its stream and mark it PENDING.
local function xadd_task(t, ttl, now_ms, enqueued_at)
  local stream = K.stream(t.queue, txt(t.priority))
  local cmd = {'XADD', stream, '*'}
  for _, f in ipairs(ENTRY_FIELDS) do
    local v = t[f]
    if v ~= nil and v ~= '' then
      cmd[#cmd + 1] = f
      cmd[#cmd + 1] = type(v) == 'number' and txt(v) or v
    end
  end
  local entry_id = redis.call(unpack(cmd))
  local tkey = K.task(t.id)
  -- _e/_st name the task's one live entry: an older entry of the same id (revoked, then
  -- sent again) is stale and must not run, and a revoke deletes the entry outright.
  if own_reply(t) then
    redis.call('HSET', tkey, 'state', 'PENDING', 'name', t.name, 'queue', t.queue,
      'enqueued_at', enqueued_at or txt(now_ms), '_e', entry_id, '_st', stream, 'reply', t.reply)
  else
    redis.call('HSET', tkey, 'state', 'PENDING', 'name', t.name, 'queue', t.queue,
      'enqueued_at', enqueued_at or txt(now_ms), '_e', entry_id, '_st', stream)
  end
  journal('PENDING', t.id, t.name, t.queue)
  if t.eb then redis.call('HSET', tkey, '_eb', cmsgpack.pack(t.eb)) end
  redis.call('PEXPIRE', tkey, txt(ttl * 1000))
end

-- Keep a task record in the delayed zset until due_ms, the record itself in the task
-- hash (`_rec`; fetch.lua puts it on its stream when due), and mark it SCHEDULED.
local function schedule_task(t, ttl, now_ms, due_ms)
  local tkey = K.task(t.id)
  redis.call('HSET', tkey, 'state', 'SCHEDULED', 'name', t.name, 'queue', t.queue,
    'enqueued_at', now_ms, 'eta', due_ms, '_rec', cmsgpack.pack(t))
  if own_reply(t) then redis.call('HSET', tkey, 'reply', t.reply) end
  redis.call('PEXPIRE', tkey, ttl * 1000 + (due_ms - now_ms))
  redis.call('ZADD', K.delayed(), due_ms, t.id)
  journal('SCHEDULED', t.id, t.name, t.queue)
end

-- A debounced send (t.db = its key) supersedes the previous send of the key while that
-- one still waits: the previous one never runs, and becomes an alias whose final state
-- and result are this one's (final_write copies them), with every earlier alias.
local function debounce(t, due_ms, now_ms)
  local dk = K.debounce(t.db)
  local prev = redis.call('GET', dk)
  redis.call('SET', dk, t.id, 'PX', math.max(due_ms - now_ms, 0) + 60000)
  if not prev or prev == t.id then return end
  local pk = K.task(prev)
  local h = redis.call('HMGET', pk, 'state', '_aliases')
  if h[1] ~= 'SCHEDULED' then return end  -- it runs already: this send opens a new window
  redis.call('ZREM', K.delayed(), prev)
  redis.call('HDEL', pk, '_rec', '_aliases')
  local aliases = read_record(h[2]) or {}
  aliases[#aliases + 1] = prev
  redis.call('HSET', K.task(t.id), '_aliases', cmsgpack.pack(aliases))
end

local settle_unrun  -- defined below: enqueue_task and the settling call each other

-- Enqueue one task record on its stream now, or in the delayed zset when it is due later
-- (t.due, an absolute time in ms, or t.delay, ms from now).
-- mode 'send': skip when the id is queued, scheduled or running (dedup);
-- mode 'follow': skip when the id exists at all (a continuation enqueued twice);
-- mode 'retry': the running task again, unless that retry number is already enqueued
-- (a finish replayed after a lost reply) or the task is final (revoked meanwhile);
-- mode 'defer': the same message later (a rate limit), unless final or scheduled.
-- Returns 1 when enqueued, 0 when skipped.
local function enqueue_task(mode, t, now_ms)
  local tkey = K.task(t.id)
  local cur = redis.call('HMGET', tkey, 'state', 'retries', '_replaced', '_w', '_unsent')
  local state = cur[1]
  local again = mode == 'retry' or mode == 'defer'
  if cur[5] and state == 'REVOKED' and not again then
    -- Revoked before it was sent (revoke.lua: a frozen id, a canvas step not reached
    -- yet): this send is dropped, and what waits on it is settled as revoked.
    redis.call('HDEL', tkey, '_unsent')
    settle_unrun(t.id, 'REVOKED', nil, nil, t.cid, t.cix, t.tail, tonumber(t.ttl), now_ms)
    return 0
  end
  if cur[3] and not again then
    -- The final task of a replacement takes the place of the task it replaced (the
    -- same id): its record, reply channel and errbacks stay.
    redis.call('HDEL', tkey, '_replaced')
    state = nil
  end
  if state and (mode == 'follow' or (mode == 'send' and LIVE[state])
      or (again and FINAL[state])
      or (mode == 'retry' and tonumber(cur[2] or 0) >= (tonumber(t.r) or 0))
      or (mode == 'defer' and state == 'SCHEDULED')) then
    return 0
  end
  -- A new send of a finished id starts a clean record; a retry keeps its own.
  if state and not again then
    redis.call('DEL', tkey)
    -- Someone watching the id (watch.lua) goes on hearing of its new run.
    if cur[4] then redis.call('HSET', tkey, '_w', 1) end
  end
  -- A deferral (a rate limit, a paused queue) never ran: no trace of its start stays.
  if mode == 'defer' and state then redis.call('HDEL', tkey, 'started_at', 'worker') end
  if t.r and t.r ~= '' then redis.call('HSET', tkey, 'retries', t.r) end
  -- Rounded down to whole ms: a producer whose numbers are all doubles (JavaScript)
  -- sends 1500.7, which PEXPIRE and the stored eta would refuse halfway.
  local due_ms = math.floor(math.max(tonumber(t.due) or 0, now_ms + (tonumber(t.delay) or 0)))
  t.due, t.delay = nil, nil
  if t.db and mode == 'send' then debounce(t, due_ms, now_ms) end
  t.db = nil
  if due_ms > now_ms then
    schedule_task(t, t.ttl, now_ms, due_ms)
  else
    xadd_task(t, t.ttl, now_ms)
  end
  if again and cur[4] then
    -- A retry or a deferral leaves STARTED: watchers (updates()) hear of it, as of the
    -- STARTED that follows (unwatched, it costs no PUBLISH).
    redis.call(PUBLISH, K.done_channel(t.id), due_ms > now_ms and 'SCHEDULED' or 'PENDING')
  end
  return 1
end

-- Enqueue an errback record with the failure it is for in its entry field `err` (not
-- for an immutable one). Its id was chosen at send time: it is enqueued once.
local function send_errback(rec, failure, now_ms)
  if rec.imm ~= 1 then
    failure.chord_id = rec.ecid
    rec.err = cmsgpack.pack(failure)
  end
  enqueue_task('follow', rec, now_ms)
end

-- The task hash fields final_write needs, read in one HMGET (done() reads them with
-- the state it checks, so a finish costs one read per task).
local FINAL_READ = {'_eb', 'name', '_aliases', 'reply', '_w', '_replaced'}

-- Record a final state with `flat` (its fields as name, value, ...), drop what only a
-- live task needs, wake the waiters (with the result `ct`/`result`, when stored), and on
-- FAILURE send the errbacks stored with the task (with `exc_type`/`exc_message`).
-- `pre`: FINAL_READ's values when already read, by a caller that found no `revoked_at`
-- (done() in finish.lua). `a`, `b`: the part of `flat` that holds the fields (all of it
-- when nil).
local function write_final(id, state, flat, ttl, now_ms, pre, ct, result, exc_type, exc_message,
                           a, b)
  a, b = a or 1, b or #flat
  local tkey = K.task(id)
  local h = pre or redis.call('HMGET', tkey, unpack(FINAL_READ))
  -- A task that ran from its stream with nothing else of a live task on it (the common
  -- case: no errbacks, aliases, replacement or revoke; `_rec` goes when it falls due)
  -- has only its entry fields left: they are blanked in this HSET instead of deleted
  -- by an HDEL, a command less per task.
  local plain = pre and not h[1] and not h[3] and not h[6]
  if plain then
    redis.call('HSET', tkey, 'state', state, '_e', '', '_st', '', unpack(flat, a, b))
  else
    redis.call('HSET', tkey, 'state', state, unpack(flat, a, b))
  end
  if state == 'FAILURE' and h[1] then
    for _, rec in ipairs(read_record(h[1]) or {}) do
      send_errback(rec, {task_id = id, name = h[2] or '', exc_type = exc_type or '',
        exc_message = exc_message or ''}, now_ms)
    end
  end
  if not plain then
    redis.call('HDEL', tkey, '_rec', '_e', '_st', '_eb', '_replaced', 'revoked_at', '_aliases',
      '_unsent')
  end
  redis.call('PEXPIRE', tkey, txt(ttl * 1000))
  notify(id, state, ct, result, h[4], h[5])
  journal(state, id)
  -- The sends this debounced one superseded end as it did.
  for _, alias in ipairs(read_record(h[3]) or {}) do
    local akey = K.task(alias)
    redis.call('HSET', akey, 'state', state, unpack(flat, a, b))
    redis.call('PEXPIRE', akey, ttl * 1000)
    notify(alias, state, ct, result)
    journal(state, alias)
  end
end

-- write_final with the fields as a map (nil values are left out).
local function final_write(id, state, fields, ttl, now_ms)
  local flat = {}
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  write_final(id, state, flat, ttl, now_ms, nil, fields.ct, fields.result, fields.exc_type,
    fields.exc_message)
end

local settle_chord

-- Fail a task that never ran (or whose predecessor failed): its waiters must wake.
-- failed_id: for a ChordError, the header task that failed.
local function fail_task(id, state, exc_type, exc_message, ttl, now_ms, failed_id, traceback)
  if not id or id == '' then return end
  local prev = redis.call('HGET', K.task(id), 'state')
  if prev and FINAL[prev] then return end
  local fields = {finished_at = now_ms}
  if state == 'FAILURE' then
    fields.exc_type, fields.exc_message, fields.failed_task_id = exc_type, exc_message, failed_id
    fields.traceback = traceback
  end
  final_write(id, state, fields, ttl, now_ms)
end

-- Fail a chord's body for the header `id` that ended `state`: a group (its results
-- gathered by COLLECT), not a chord the user wrote, ends as its member did, as a Celery
-- group does, and what waits on it hears of that member; a chord ends with ChordError.
-- Returns the body's state, exc_type and exc_message.
local function fail_body(body, id, state, exc_type, exc_message, ttl, now_ms)
  local group = body.name == COLLECT
  local out, etype, emsg, tb = 'FAILURE', 'ChordError', nil, nil
  if group then
    out = state == 'REVOKED' and 'REVOKED' or 'FAILURE'
    etype, emsg = exc_type, exc_message
    tb = redis.call('HGET', K.task(id), 'traceback') or nil
  else
    emsg = 'header task ' .. id .. ' ended ' .. state
    if exc_type and exc_type ~= '' then
      emsg = emsg .. ': ' .. exc_type .. ': ' .. (exc_message or '')
    end
  end
  -- The body never ran: its name and queue are written here (an outer chord's on_error
  -- names it, info() shows it).
  final_write(body.id, out, {finished_at = now_ms, exc_type = etype, exc_message = emsg,
    failed_task_id = id, traceback = tb, name = body.name, queue = body.queue}, ttl, now_ms)
  fail_task(body.tail, out, etype, emsg, ttl, now_ms, id)
  if body.cid and body.cid ~= '' then
    settle_chord(body.cid, body.cix, group and id or body.id, out, '', etype, emsg, now_ms)
  end
  return out, etype, emsg
end

-- Record a header's final state for its chord. Idempotent per header index; the call
-- that records the last success enqueues the body, once, behind the `fired` flag.
settle_chord = function(cid, idx, id, state, value, exc_type, exc_message, now_ms)
  local ck = K.chord(cid)
  if redis.call('EXISTS', ck) == 0 or redis.call('HEXISTS', ck, 'fired') == 1 then
    return
  end
  local ttl = tonumber(redis.call('HGET', ck, 'ttl'))
  local rk = K.chord_results(cid)
  if state == 'SUCCESS' then
    if redis.call('HSETNX', rk, idx, value) == 0 then return end
    redis.call('PEXPIRE', rk, ttl * 1000)
    local done = redis.call('HINCRBY', ck, 'done', 1)
    if done < tonumber(redis.call('HGET', ck, 'n')) then return end
    redis.call('HSET', ck, 'fired', 'body')
    local body = read_record(redis.call('HGET', ck, 'body'))
    -- 'send': a body whose id finished before (a chord sent again) runs again; the
    -- `fired` flag above is what makes it once per chord.
    if body then enqueue_task('send', body, now_ms) end
    return
  end
  redis.call('HSET', ck, 'fired', 'error', 'failed_id', id, 'exc_type', exc_type or state,
    'exc_message', exc_message or '')
  redis.call('DEL', rk)
  local body = read_record(redis.call('HGET', ck, 'body'))
  if not body then return end  -- unreadable (another version's chord): nothing to fail
  local unsent = redis.call('HGET', K.task(body.id), '_unsent')
  local out, etype, emsg = 'REVOKED', nil, nil
  if unsent then
    -- The body was revoked before it was sent: it stays REVOKED, and so ends what waits
    -- on it; on_error still hears of the failed header.
    redis.call('HDEL', K.task(body.id), '_unsent')
    settle_unrun(body.id, 'REVOKED', nil, nil, body.cid, body.cix, body.tail, ttl, now_ms)
  else
    out, etype, emsg = fail_body(body, id, state, exc_type, exc_message, ttl, now_ms)
  end
  local on_error = read_record(redis.call('HGET', ck, 'on_error'))
  if on_error then
    local name = redis.call('HGET', K.task(id), 'name')
    send_errback(on_error, {task_id = id, name = name or '',
      exc_type = exc_type or state, exc_message = exc_message or ''}, now_ms)
  end
  -- The body's own errbacks (its `link_error`), as Celery sends them when a header fails:
  -- it never ran, so its hash holds none. After on_error, which may be one of them (the
  -- same id, enqueued once) and reports the header that failed.
  if out == 'FAILURE' then
    for _, rec in ipairs(body.eb or {}) do
      send_errback(rec, {task_id = body.id, name = body.name or '', exc_type = etype or '',
        exc_message = emsg or ''}, now_ms)
    end
  end
end

-- A task that will not run (revoked, expired, dead-lettered) still settles what waits on it.
settle_unrun = function(id, state, exc_type, exc_message, cid, cix, tail, ttl, now_ms)
  fail_task(id, state, exc_type, exc_message, ttl, now_ms)
  fail_task(tail, state, exc_type, exc_message, ttl, now_ms, id)
  if cid and cid ~= '' then
    settle_chord(cid, cix, id, state, '', exc_type, exc_message, now_ms)
  end
end

-- Entries to ack, by stream, when a script defers its acks (finish.lua: an XACK and an
-- XTRIM or XDEL per stream per batch instead of two commands per task).
local ACKS

local function ack(stream, entry_id)
  if ACKS then
    push(ACKS, stream, entry_id)
    return
  end
  redis.call('XACK', stream, GROUP, entry_id)
  redis.call('XDEL', stream, entry_id)
end

local function defer_acks()
  ACKS = {}
end

-- An entry id as numbers: ms, seq.
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

-- Whether entry id a sorts before entry id b. Ids of one stream are alike ("ms-seq",
-- the same number of digits on each side of the dash) but at a rare change of width:
-- then as numbers.
local function id_below(a, b)
  local dash = string.find(a, '-', 1, true)
  if #a == #b and dash == string.find(b, '-', 1, true) then return a < b end
  local ams, aseq = id_parts(a)
  local bms, bseq = id_parts(b)
  return ams < bms or (ams == bms and aseq < bseq)
end

-- Acked entries leave their stream. XDEL of a stream's oldest entry walks the entries
-- deleted before it in its node twice (to find it, then the stream's new first id), so
-- deleting in the order tasks arrive costs that per task. A batch trims instead: every
-- entry it acked was pending in the group, so the group had delivered everything up to
-- them, and what lies below the oldest entry still pending (below the newest acked one
-- when none is) was acked: one exact XTRIM MINID drops it in one walk. Entries acked
-- above the oldest pending one (finished out of order) are deleted one by one. A lone
-- entry, or one the group no longer held (it was lost and made again), is deleted.
local function drop_acked(stream, ids)
  local acked = 0
  for i = 1, #ids, 1000 do
    acked = acked + redis.call('XACK', stream, GROUP, unpack(ids, i, math.min(i + 999, #ids)))
  end
  local rest = ids
  if #ids > 1 and acked == #ids then
    local head = redis.call('XPENDING', stream, GROUP)[2]
    if not head then
      local newest = ids[1]
      for _, id in ipairs(ids) do
        if id_below(newest, id) then newest = id end
      end
      local ms, seq = id_parts(newest)
      head = txt(ms) .. '-' .. txt(seq + 1)
    end
    redis.call('XTRIM', stream, 'MINID', head)
    rest = {}
    for _, id in ipairs(ids) do
      if not id_below(id, head) then rest[#rest + 1] = id end
    end
  end
  for i = 1, #rest, 1000 do
    redis.call('XDEL', stream, unpack(rest, i, math.min(i + 999, #rest)))
  end
end

local function flush_acks()
  local acks = ACKS
  ACKS = nil
  for stream, ids in pairs(acks or {}) do drop_acked(stream, ids) end
end

-- Decide whether a delivered entry (fields `flat`: name, value, ...) runs: an expired or
-- revoked one is settled, acked and deleted here instead. Marks a running one STARTED.
-- Returns true to run it.
local function start_entry(stream, entry_id, flat, now_ms, worker, deliveries, default_ttl)
  local id, exp, r, cid, cix, tail, dl = pick(flat, 1, #flat, 'id', 'exp', 'r', 'cid', 'cix',
    'tail', 'dl')
  if not id then return true end  -- undecodable: the worker dead-letters it
  local tkey = K.task(id)
  local h = redis.call('HMGET', tkey, 'state', '_e', 'revoked_at', '_w')
  -- '' is a finished task's blanked entry (write_final): none is live.
  if h[2] and h[2] ~= '' and h[2] ~= entry_id then
    -- A stale entry: the id was revoked and sent again, and that newer entry runs.
    ack(stream, entry_id)
    return false
  end
  local state = h[1]
  exp = tonumber(exp)
  if state == 'REVOKED' or h[3] or (exp and exp < now_ms) then
    ack(stream, entry_id)
    settle_unrun(id, 'REVOKED', nil, nil, cid, cix, tail, default_ttl, now_ms)
    return false
  end
  redis.call('HSET', tkey, 'state', 'STARTED', 'started_at', txt(now_ms), 'worker', worker,
    'attempts', txt((tonumber(r) or 0) + (tonumber(dl) or 0) + deliveries))
  -- Published when watched, or when the hash was lost (a restart, a failover): a
  -- watcher's mark may have gone with it.
  if h[4] or not h[1] then redis.call(PUBLISH, K.done_channel(id), 'STARTED') end
  journal('STARTED', id)
  return true
end

-- Move an entry (flat fields `flat`, as a map `f`) to its queue's dead letters with its
-- original fields plus `reason` and `stream`, ack it, and fail its task (settling what
-- waits on it).
local function dead_letter(stream, entry_id, flat, f, queue, exc_type, exc_message, ttl,
                           now_ms)
  local cmd = flat_without(flat, 'reason', 'stream', {'XADD', K.dead(queue), '*'})
  cmd[#cmd + 1] = 'reason'
  cmd[#cmd + 1] = exc_type .. ': ' .. exc_message
  cmd[#cmd + 1] = 'stream'
  cmd[#cmd + 1] = stream
  redis.call(unpack(cmd))
  if f.id then
    settle_unrun(f.id, 'FAILURE', exc_type, exc_message, f.cid, f.cix, f.tail, ttl, now_ms)
  end
  -- Acked last: a script error above (they are not rolled back) leaves it pending.
  ack(stream, entry_id)
end

-- The fields of one entry (a map), or nil when it is gone from its stream.
local function entry_fields(stream, entry_id)
  local found = redis.call('XRANGE', stream, entry_id, entry_id)
  if found[1] == nil then return nil end
  return fields_map(found[1][2]), found[1][2]
end

-- A reply of records: one msgpack value, decoded by contract.unpack_reply.
local function reply(value)
  return cmsgpack.pack(value)
end

-- Concurrency slots: `slots:<key>` holds the ids running under a key's limit, scored by
-- the end of their lease (the visibility timeout, renewed by the heartbeat), so a slot
-- held by a dead worker frees itself. Entries over the limit wait in `slots:<key>:w`
-- (their task reads SCHEDULED) and go back to their stream, with a slot reserved for
-- them, when one frees.

-- Put waiting entries back on their streams while the key has free slots.
local function wake(key, limit, now_ms, lease_ms)
  local sk, wk = K.slots(key), K.slot_waiters(key)
  redis.call('ZREMRANGEBYSCORE', sk, '-inf', now_ms)
  while redis.call('ZCARD', sk) < limit do
    local item = redis.call('LPOP', wk)
    if not item then
      redis.call('SREM', K.slot_keys(), key)
      return
    end
    local w = read_record(item)
    local tkey = w and K.task(w.id)
    if w and not FINAL[redis.call('HGET', tkey, 'state') or ''] then
      redis.call('ZADD', sk, now_ms + lease_ms, w.id)  -- reserved for it
      redis.call('PEXPIRE', sk, lease_ms + 60000)
      local flat = {}
      for k, v in pairs(w.fields) do
        flat[#flat + 1] = k
        flat[#flat + 1] = v
      end
      local entry_id = redis.call('XADD', w.stream, '*', unpack(flat))
      redis.call('HSET', tkey, 'state', 'PENDING', '_e', entry_id, '_st', w.stream)
      redis.call(PUBLISH, K.done_channel(w.id), 'PENDING')
      journal('PENDING', w.id)
    end
  end
end

-- Give back the slot a task held (slot = {key, limit, lease}) and wake a waiter.
local function release_slot(slot, id, now_ms)
  if not slot then return end
  redis.call('ZREM', K.slots(slot.key), id)
  wake(slot.key, tonumber(slot.limit), now_ms, tonumber(slot.lease))
end

-- Every script's first statement: take this call's key prefix (KEYS[1]) and start with
-- nothing gathered (journal, replies, acks), whatever a call that failed before left.
-- Loaded as a function library (scripts.py), this file runs once, not once per call.
local function begin(keys)
  P = keys[1]
  CAPS, LINES, FINISHED, REPLIES, ACKS, TXT = nil, {}, {}, nil, nil, {}
end
