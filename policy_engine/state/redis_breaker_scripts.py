"""The Lua transcription of :mod:`policy_engine.algorithms.breaker`: one script per operation.

Kept apart from :mod:`policy_engine.state.redis_breakers` because it is another language.
``ACQUIRE``, ``RECORD`` and ``RELEASE`` are the Python functions of those names, step for
step (the same comparisons, in the same order, on the same doubles), so a breaker behaves
alike in one process and shared through Redis; ``tests/test_redis_breakers.py`` runs both
on random sequences and compares every answer and every state. ``RECORD_MANY`` runs
``RECORD`` (wrapped, unchanged) for several outcomes in turn: those one process records
within one pass of its event loop, one script instead of one each.

The state of a breaker is one hash, ``{prefix}:cb:{rule}``:

====================  =============================================================
``circuit``           ``closed``, ``open`` or ``half_open``
``since``             when the circuit was entered, ``%.17g`` (exact as a double)
``permits``           probes handed out while ``half_open``
``window``            ``''`` (empty), ``calls`` (count-based) or ``time`` (time-based)
``calls``             outcomes in the window
``failed``, ``slow``  failed and slow outcomes among them
``entries``           the outcomes, oldest first (below)
====================  =============================================================

A count window's ``entries`` is a string of one flag per call, oldest first: the digit
``failed + 2 * slow`` (``0`` a fast success, ``1`` a failure, ``2`` slow, ``3`` both). The
algorithm's bit sets, bit 0 the newest, read it backwards; the counts are kept beside it so
no call scans it. A time window's ``entries`` is its per-second buckets, oldest first, each
20 bytes packed as ``>dI4I4I4`` (the second as a double, then calls, failed, slow as
32-bit counts), so that dropping old buckets reads only the ones dropped. ``READ`` hands the
state back for status pages. A key that holds something else (another type, or a hash whose
fields do not make a state) counts as a closed breaker with an empty window, as a value the
JSON codec cannot decode does, and the next write replaces it.

The spec is passed with every call, never stored: a hot reload that changes a breaker's
parameters keeps its state. ``KEYS[1]`` is the hash; ``ARGV`` of ``ACQUIRE`` and ``RECORD``
begins with the same nine values (``SPEC``): ``now``, ``window.calls`` (``''`` when
time-based), ``window.time`` (``''`` when count-based), ``minimum_calls``,
``failure_rate``, ``slow_call.over`` (``''`` without ``slow_call``), ``slow_call.rate``,
``open_for`` and ``half_open_calls``. Numbers go in as Python's ``repr`` writes them
(``inf`` included) and floats come back as ``%.17g`` strings, since Redis truncates a Lua
number in a reply to an integer.

``now`` is the caller's seconds, or ``''`` for Redis's own clock (``TIME``): processes that
use it need no agreement between their clocks. Redis 5 and later replicate a script's
effects rather than the script, which is what lets a writing script read the clock.
"""

_PRELUDE = """
local FIELDS = {'circuit', 'since', 'permits', 'window', 'calls', 'failed', 'slow', 'entries'}
local CIRCUITS = {closed = true, open = true, half_open = true}
local BUCKET = '>dI4I4I4'
local BUCKET_SIZE = 20

local function number(text)
  if text == 'inf' then return math.huge end
  if text == '-inf' then return -math.huge end
  return tonumber(text)
end

local function exact(value)
  return string.format('%.17g', value)
end

local function clock(arg)
  if arg ~= '' then return number(arg) end
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end

local function read_spec()
  return {
    calls = tonumber(ARGV[2]),
    time = number(ARGV[3]),
    minimum_calls = tonumber(ARGV[4]),
    failure_rate = number(ARGV[5]),
    slow_over = number(ARGV[6]),
    slow_rate = number(ARGV[7]),
    open_for = number(ARGV[8]),
    half_open_calls = tonumber(ARGV[9]),
  }
end

local function state_of(circuit, since, permits)
  return {circuit = circuit, since = since, permits = permits,
          window = '', calls = 0, failed = 0, slow = 0, entries = ''}
end

-- The stored state, and whether the key holds another type (to delete before writing).
local function load(key)
  local raw = redis.pcall('HMGET', key, unpack(FIELDS))
  if raw.err then return state_of('closed', 0, 0), true end
  local state = {circuit = raw[1], since = number(raw[2]), permits = tonumber(raw[3]),
                 window = raw[4], calls = tonumber(raw[5]), failed = tonumber(raw[6]),
                 slow = tonumber(raw[7]), entries = raw[8]}
  local valid = CIRCUITS[state.circuit] and state.since and state.permits and state.calls
                and state.failed and state.slow and type(state.entries) == 'string'
  if valid then
    if state.window == 'calls' then
      valid = #state.entries == state.calls
    elseif state.window == 'time' then
      valid = #state.entries % BUCKET_SIZE == 0
    else
      valid = state.window == ''
    end
  end
  if not valid then return state_of('closed', 0, 0), false end
  return state, false
end

local function save(key, state, stale)
  if stale then redis.call('DEL', key) end
  redis.call('HSET', key, 'circuit', state.circuit, 'since', exact(state.since),
             'permits', state.permits, 'window', state.window, 'calls', state.calls,
             'failed', state.failed, 'slow', state.slow, 'entries', state.entries)
end

local function probes(spec)
  if spec.half_open_calls > 0 then return spec.half_open_calls end
  return 1
end
"""

_RECORD_STEPS = """
-- A window of the same kind as the state's, or an empty one: a window of the other kind
-- starts over.
local function window_of(state, kind)
  if state.window == kind then return state end
  return state_of(state.circuit, state.since, state.permits)
end

-- _push_count: append one flag, keep the newest ``size``.
local function push_count(window, size, failed, slow)
  local flag = 0
  local calls, failures, slows = window.calls + 1, window.failed, window.slow
  if failed then flag = 1; failures = failures + 1 end
  if slow then flag = flag + 2; slows = slows + 1 end
  local entries = window.entries .. string.char(48 + flag)
  local extra = #entries - size
  if extra > 0 then
    for i = 1, extra do
      local gone = string.byte(entries, i) - 48
      if gone % 2 == 1 then failures = failures - 1 end
      if gone >= 2 then slows = slows - 1 end
    end
    entries = string.sub(entries, extra + 1)
    calls = size
  end
  return {window = 'calls', calls = calls, failed = failures, slow = slows, entries = entries}
end

-- _push_time: drop the buckets at or before ``floor(now) - seconds``, then count the call in
-- the newest bucket if it is this second (or later), else in a new one.
local function push_time(window, seconds, now, failed, slow)
  local second = math.floor(now)
  local horizon = second - seconds
  local entries = window.entries
  local f, s = 0, 0
  if failed then f = 1 end
  if slow then s = 1 end
  local calls, failures, slows = window.calls + 1, window.failed + f, window.slow + s
  local size = #entries / BUCKET_SIZE
  local first = 0
  while first < size do
    local at, gone_calls, gone_failed, gone_slow =
      struct.unpack(BUCKET, entries, first * BUCKET_SIZE + 1)
    if at > horizon then break end
    calls = calls - gone_calls
    failures = failures - gone_failed
    slows = slows - gone_slow
    first = first + 1
  end
  local kept
  local last_at, last_calls, last_failed, last_slow
  if first < size then
    last_at, last_calls, last_failed, last_slow =
      struct.unpack(BUCKET, entries, (size - 1) * BUCKET_SIZE + 1)
  end
  if first < size and last_at >= second then
    kept = string.sub(entries, first * BUCKET_SIZE + 1, (size - 1) * BUCKET_SIZE)
      .. struct.pack(BUCKET, last_at, last_calls + 1, last_failed + f, last_slow + s)
  else
    kept = string.sub(entries, first * BUCKET_SIZE + 1) .. struct.pack(BUCKET, second, 1, f, s)
  end
  return {window = 'time', calls = calls, failed = failures, slow = slows, entries = kept}
end

-- _verdict: the reason to open, or nil.
local function verdict(spec, calls, failed, slow, minimum)
  if calls == 0 or calls < minimum then return nil end
  if failed / calls >= spec.failure_rate then return 'failure_rate' end
  if spec.slow_over and slow / calls >= spec.slow_rate then return 'slow_call_rate' end
  return nil
end
"""

ACQUIRE = (
    _PRELUDE
    + """
-- breaker.acquire. ARGV: SPEC. Returns {permitted (1 or 0), the circuit,
-- now, the time a retry gets through ('' when permitted), 1 if the circuit went from
-- open to half_open (else 0)}; now is '' when nothing needed the clock.
local key = KEYS[1]
local spec = read_spec()
local state, stale = load(key)
if state.circuit == 'closed' then return {1, 'closed', '', '', 0} end
local now = clock(ARGV[1])
if state.circuit == 'open' then
  local reopen_at = state.since + spec.open_for
  if now < reopen_at then return {0, 'open', exact(now), exact(reopen_at), 0} end
  save(key, state_of('half_open', now, 1), stale)
  return {1, 'half_open', exact(now), '', 1}
end
if state.permits < probes(spec) then
  state.permits = state.permits + 1
  save(key, state, stale)
  return {1, 'half_open', exact(now), '', 0}
end
local lease_ends = state.since + spec.open_for
if now >= lease_ends then
  -- Probes out for a whole open_for without a verdict are lost: a new round begins.
  save(key, state_of('half_open', now, 1), stale)
  return {1, 'half_open', exact(now), '', 0}
end
return {0, 'half_open', exact(now), exact(lease_ends), 0}
"""
)

RECORD = (
    _PRELUDE
    + _RECORD_STEPS
    + """
-- breaker.record. ARGV: SPEC, then '1' if the call failed (else '0') and
-- its duration in seconds. Returns nil, or the transition {from, to, reason, now}.
local key = KEYS[1]
local spec = read_spec()
local failed = ARGV[10] == '1'
local duration = number(ARGV[11])
local state, stale = load(key)
if state.circuit == 'open' then return false end
local now = clock(ARGV[1])
local slow = spec.slow_over ~= nil and duration > spec.slow_over
if state.circuit == 'closed' then
  local window, minimum
  if spec.calls then
    window = push_count(window_of(state, 'calls'), spec.calls, failed, slow)
    minimum = math.min(spec.minimum_calls, spec.calls)
  elseif spec.time then
    local seconds = math.max(1, math.ceil(spec.time))
    window = push_time(window_of(state, 'time'), seconds, now, failed, slow)
    minimum = spec.minimum_calls
  else
    return redis.error_reply('circuit breaker has neither window.calls nor window.time')
  end
  local reason = verdict(spec, window.calls, window.failed, window.slow, minimum)
  if not reason then
    window.circuit, window.since, window.permits = 'closed', state.since, 0
    save(key, window, stale)
    return false
  end
  save(key, state_of('open', now, 0), stale)
  return {'closed', 'open', reason, exact(now)}
end
local size = probes(spec)
local counts = push_count(window_of(state, 'calls'), size, failed, slow)
if counts.calls < size then
  counts.circuit, counts.since, counts.permits = 'half_open', state.since, state.permits
  save(key, counts, stale)
  return false
end
local reason = verdict(spec, counts.calls, counts.failed, counts.slow, size)
if not reason then
  save(key, state_of('closed', now, 0), stale)
  return {'half_open', 'closed', 'probes_succeeded', exact(now)}
end
save(key, state_of('open', now, 0), stale)
return {'half_open', 'open', reason, exact(now)}
"""
)

RELEASE = (
    _PRELUDE
    + """
-- breaker.release: a half-open probe whose call never ran goes back. No ARGV; returns nil.
local key = KEYS[1]
local state, stale = load(key)
if state.circuit == 'half_open' and state.permits > 0 then
  state.permits = state.permits - 1
  save(key, state, stale)
end
return false
"""
)

READ = (
    _PRELUDE
    + """
-- The stored state, for status pages. No ARGV. Returns {circuit, since, permits, window,
-- calls, failed, slow, entries}: entries as stored for a count window, and for a time window
-- the buckets flattened (second as %.17g, calls, failed, slow, second, ...).
local state = load(KEYS[1])
local entries = state.entries
if state.window == 'time' then
  entries = {}
  for at = 1, #state.entries, BUCKET_SIZE do
    local second, calls, failed, slow = struct.unpack(BUCKET, state.entries, at)
    table.insert(entries, exact(second))
    table.insert(entries, calls)
    table.insert(entries, failed)
    table.insert(entries, slow)
  end
end
return {state.circuit, exact(state.since), state.permits, state.window, state.calls,
        state.failed, state.slow, entries}
"""
)

RECORD_MANY = f"""
local function record(KEYS, ARGV)
{RECORD}
end

-- breaker.record for several outcomes in turn, as many RECORD calls would. ARGV: SPEC (its
-- now unused), then n, then n times: now, '1' if the call failed (else '0'), its duration.
-- Returns each outcome's transition (or false), in order.
local n = tonumber(ARGV[10])
local args = {{}}
for i = 1, 9 do args[i] = ARGV[i] end
local replies = {{}}
for i = 1, n do
  local at = 10 + (i - 1) * 3
  args[1], args[10], args[11] = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  replies[i] = record(KEYS, args)
end
return replies
"""
