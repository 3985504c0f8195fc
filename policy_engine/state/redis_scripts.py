"""The Lua scripts of the Redis store: each one atomic step that Redis runs whole.

Kept apart from :mod:`policy_engine.state.redis_store` because they are another language:
each script's comment says what its ``KEYS`` and ``ARGV`` hold and what it returns, which is
the whole contract between the two.

Keys, by rule name and key, never by a rule's parameters, so a hot reload that keeps a
rule keeps its state. ``P`` is the prefix (``policy-engine`` unless given; no braces in
it), ``R`` a rule name (never with ``:``), ``K`` a limit's or a sign-in's key, ``A`` an
algorithm's letter (see redis_limits), ``U`` a user, ``I`` a client address, ``S`` a
replay stream, ``D`` a process id. Braces are written as they are: they make a Redis
Cluster hash tag, the part of a name Redis Cluster puts the key by (a script may only
touch keys of one slot). The same names serve on one Redis, where tags mean nothing::

    P:rl:{T}:R:K:A        rate-limit state, expires when empty again; T is a short hash
                          of R and K, so that the keys spread over a cluster's nodes
    P:cb:R                circuit breaker state, a hash (see redis_breaker_scripts)
    {P:conn}:total        connections counted, all live processes together
    {P:conn}:user:U       connections per user (deleted at zero)
    {P:conn}:ip:I         connections per client address (deleted at zero)
    {P:conn}:proc:D       one process's share of those counts (see redis_connections)
    {P:conn}:leases       processes scored by when their lease ends
    P:auth:K              authentication failures: sorted set scored by time
    {P:replay}:stream:S   replay buffer: list of JSON [id, time, event, data]
    {P:replay}:id:S       a stream's last id: outlives its buffer for twice its TTL
    {P:replay}:streams    streams scored by their newest event, to drop idle ones
    {P:replay}:bytes      bytes buffered per stream (a hash)
    {P:replay}:total      bytes buffered in all streams

A breaker and a key's sign-in failures are one key each, in any slot. All connection
counts share the tag ``{P:conn}``, and all replay buffers ``{P:replay}``: their scripts
touch keys they compute (a dead process's counts, the idle streams to drop), so on a
Redis Cluster each of the two lives whole on one node. The rate limits of one event may
be in several slots: see redis_limits for how they are judged together.
"""

RECORD_AUTH_FAILURE = """
-- KEYS[1]: the failures. ARGV: now, the window's start (failures at or before it have
-- left), a unique member, a TTL in ms ('0': none), how many failures are kept.
-- Returns the failures within the window, this one included.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -1 - tonumber(ARGV[5]))
if ARGV[4] == '0' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return redis.call('ZCARD', KEYS[1])
"""

AUTH_FAILURES = """
-- KEYS[1]: the failures. ARGV[1]: the window's start. Returns {count, newest time}.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #newest == 0 then return {0, '0'} end
return {redis.call('ZCARD', KEYS[1]), newest[2]}
"""

APPEND_REPLAY = """
-- KEYS: the buffer, the stream's last id, the index of streams by newest event, the bytes
-- buffered per stream (a hash), the bytes buffered in all.
-- ARGV: the stream, the entry after its id ('time,event,data]'), the buffer's length, now,
-- the idle horizon ('' keeps every stream), the buffer's TTL and the last id's TTL in ms
-- ('0': none), the prefix of buffer keys, how many buffers or entries to drop at most,
-- the stream's bytes at most and all streams' bytes at most ('': no bound).
-- Returns the new event's id.
local function drop_stream(stream)
  local bytes = tonumber(redis.call('HGET', KEYS[4], stream) or '0')
  redis.call('DEL', ARGV[8] .. stream)
  redis.call('ZREM', KEYS[3], stream)
  redis.call('HDEL', KEYS[4], stream)
  return bytes
end
local total = tonumber(redis.call('GET', KEYS[5]) or '0')
local bytes = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if redis.call('EXISTS', KEYS[1]) == 0 then
  total = total - bytes  -- its buffer expired: nothing of it is buffered any more
  bytes = 0
end
local id = redis.call('INCR', KEYS[2])
local entry = '[' .. id .. ',' .. ARGV[2]
local length = redis.call('RPUSH', KEYS[1], entry)
bytes = bytes + #entry
total = total + #entry
local limit = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[10])
while length > 0 and (length > limit or (max_bytes and bytes > max_bytes)) do
  local dropped = redis.call('LPOP', KEYS[1])
  bytes = bytes - #dropped
  total = total - #dropped
  length = length - 1
end
redis.call('HSET', KEYS[4], ARGV[1], bytes)
if ARGV[6] == '0' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
if ARGV[7] == '0' then
  redis.call('PERSIST', KEYS[2])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
if ARGV[5] ~= '' then
  -- Streams whose newest event is older than the horizon: nobody can recover from them.
  local idle = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[5], 'LIMIT', 0, ARGV[9])
  for _, stream in ipairs(idle) do
    total = total - drop_stream(stream)
  end
end
local max_total = tonumber(ARGV[11])
local rounds = tonumber(ARGV[9])
while max_total and total > max_total and rounds > 0 do
  -- The oldest entry of the least recently active stream goes first.
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not oldest then break end
  local dropped = redis.call('LPOP', ARGV[8] .. oldest)
  if dropped then
    total = total - #dropped
    redis.call('HINCRBY', KEYS[4], oldest, -#dropped)
  else
    total = total - drop_stream(oldest)
  end
  rounds = rounds - 1
end
if total < 0 then total = 0 end
redis.call('SET', KEYS[5], total)
return id
"""

REPLAY_SINCE = """
-- KEYS: the buffer, the stream's last id. ARGV[1]: the last id the client has.
-- Returns {-1} for an unknown stream, {0} when nothing was missed, {-2} when more was
-- missed than is buffered or the id is after the stream's last, else {1, the missed
-- entries in order}.
local last = redis.call('GET', KEYS[2])
if not last then return {-1} end
local missed = tonumber(last) - tonumber(ARGV[1])
if missed < 0 then return {-2} end
if missed == 0 then return {0} end
if missed > redis.call('LLEN', KEYS[1]) then return {-2} end
return {1, redis.call('LRANGE', KEYS[1], -missed, -1)}
"""
