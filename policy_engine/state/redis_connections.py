"""Connection counts on Redis held under leases: a process that dies stops counting.

The ceilings ``max_total``, ``max_per_user`` and ``max_per_ip`` are checked against shared
counters that every process increments and decrements. A process that crashes never
decrements, so without more its connections would stay counted for ever and refuse
legitimate users. Here each process also keeps its own counts in Redis, under a lease it
renews; once the lease runs out, the next call of any process takes those counts out of
the shared counters.

Keys (``P`` is the store's prefix; ``{P:conn}``, braces included, is a Redis Cluster hash
tag: every script here reads and writes keys it computes, so they all share one slot)::

    {P:conn}:total        connections counted, all processes together
    {P:conn}:user:U       connections per user U (deleted at zero)
    {P:conn}:ip:I         connections per client address I (deleted at zero)
    {P:conn}:proc:D       the counts of the process D: a hash of the fields ``total``,
                          ``user:U`` and ``ip:I``, each its share of the counter
                          ``{P:conn}:`` followed by the field
    {P:conn}:leases       the processes counted: a sorted set of ids scored by the end of
                          their lease, in milliseconds on Redis's clock

Each script changes a process's hash and the shared counters together, so the counters
always hold the sum of the hashes of the processes in ``{P:conn}:leases``, and a check stays
one ``GET`` per ceiling. Leases are timed by Redis's ``TIME`` inside the scripts: the
processes need no agreement on the clock (Redis 5 or later: a script may write after
reading it).

The lifecycle of a process's counts:

* Every call of the process (an open, a renewal, a close while it counts any) holds its
  lease for ``lease_ttl`` more seconds (30 by default).
  :meth:`ConnectionLeases.run_renewals` renews it every third of that, so an idle process
  keeps it too.
* Every call also reaps leases that have run out (at most ``_REAP_LIMIT`` per call):
  their counts are taken out of the shared counters, so an open decides on counts from
  which the dead have gone. A process that dies is no longer counted once its lease has
  run out and any process makes a call; the renewals of the live ones make one every
  ``lease_ttl / 3``.
* A reaped hash is not deleted but kept for ``keep_reaped`` seconds (600 by default; the
  setting of the process that reaps applies, so give every process the same).
  A process that was only paused past its lease (a stopped or swapped-out process, a
  network partition) adds it back into the counters at its next call and goes on exactly
  where it was: its closes take from it, and none of its connections is counted twice or
  lost. The process's own count, kept by the same scripts that count its connections, is
  what it re-adds: no copy in the process can drift from it while calls are in flight.
* A close takes one from a field only where the process's hash still holds one, so a
  count is never taken twice and never taken from another process's connections: the
  late close of a process whose hash was reaped and has expired (paused longer than
  ``keep_reaped``, or Redis lost its data) changes nothing. Its connections of before are
  then no longer counted: an undercount, never of more than those connections, that ends
  as connections close; none is ever counted twice.
* :meth:`ConnectionLeases.release_all` takes the process's counts out at shutdown.

Limits: a dead process still counts until its lease has run out, and its hash stays in
Redis for ``keep_reaped`` after; counts re-added after a pause can exceed a ceiling for a
while (they are connections that are really open); a script may reap a dead process of
many connections in one go (one ``INCRBY`` per field of its hash). On a Redis Cluster
every connection count is on the one node that serves their slot. A process id must
never be reused: a
process started under the id of a dead one would take its counts over (the default, a
fresh uuid4, never is).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from policy_engine.errors import StoreError
from policy_engine.state.protocol import ConnectionLimits
from policy_engine.state.redis_clients import RedisClient
from policy_engine.state.redis_pipeline import Arg, Call

DEFAULT_LEASE_TTL = 30.0
"""Seconds a process stays counted after its last call or renewal."""

DEFAULT_KEEP_REAPED = 600.0
"""Seconds a reaped process's counts are kept for its return (it was only paused)."""

_REAP_LIMIT = 16
"""Expired leases one call reaps at most, so one script never runs long."""

_LEASE = """
-- Every script starts here. KEYS[1]: the leases; KEYS[2]: this process's hash.
-- ARGV[1..5]: this process's id, its lease and how long a reaped hash is kept (both in
-- ms), the prefix of the counters ('{prefix:conn}:'), and how many leases to reap at most.
local leases, own = KEYS[1], KEYS[2]
local id, lease_ms, keep_ms = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local base, reap_limit = ARGV[4], tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- Add a process's counts to the shared counters (sign 1) or take them out (sign -1);
-- a counter that reaches zero is deleted.
local function shift(counts, sign)
  local fields = redis.call('HGETALL', counts)
  for i = 1, #fields, 2 do
    local key = base .. fields[i]
    if redis.call('INCRBY', key, sign * tonumber(fields[i + 1])) <= 0 then
      redis.call('DEL', key)
    end
  end
end

-- Processes whose lease has run out stop counting. Their hashes are kept a while, in case
-- one was only paused and comes back (see hold).
local function reap()
  local ended = redis.call('ZRANGEBYSCORE', leases, '-inf', string.format('(%d', now),
    'LIMIT', 0, reap_limit)
  for _, dead in ipairs(ended) do
    local counts = base .. 'proc:' .. dead
    shift(counts, -1)
    redis.call('PEXPIRE', counts, keep_ms)
    redis.call('ZREM', leases, dead)
  end
end

-- Hold this process's lease for lease_ms more. A process reaped while it was only paused
-- counts its connections again. Returns true when it had been reaped.
local function hold()
  local back = false
  if not redis.call('ZSCORE', leases, id) and redis.call('EXISTS', own) == 1 then
    shift(own, 1)
    redis.call('PERSIST', own)
    back = true
  end
  redis.call('ZADD', leases, now + lease_ms, id)
  return back
end
"""

OPEN = (
    _LEASE
    + """
-- KEYS[3..]: the counters a new connection counts in: the total, the user's (when it has
-- one), the address's. ARGV[6..]: their fields in a process's hash, then their ceilings
-- ('' for none), in the same order. Returns the position of the first ceiling reached,
-- or nil once the connection is counted in every counter and in this process's hash.
hold()
reap()
local n = #KEYS - 2
for i = 1, n do
  local ceiling = ARGV[5 + n + i]
  if ceiling ~= '' and tonumber(redis.call('GET', KEYS[2 + i]) or '0') >= tonumber(ceiling) then
    return i
  end
end
for i = 1, n do
  redis.call('INCR', KEYS[2 + i])
  redis.call('HINCRBY', own, ARGV[5 + i], 1)
end
return false
"""
)

CLOSE = (
    _LEASE
    + """
-- KEYS[3..]: the counters the connection was counted in; ARGV[6..]: their fields.
-- One less in each, and in this process's hash, where this process still counts one:
-- never below zero, never taken from another process. Returns 1.
if redis.call('ZSCORE', leases, id) or redis.call('EXISTS', own) == 1 then
  hold()
end
reap()
for i = 1, #KEYS - 2 do
  local field = ARGV[5 + i]
  if tonumber(redis.call('HGET', own, field) or '0') > 0 then
    if redis.call('HINCRBY', own, field, -1) <= 0 then redis.call('HDEL', own, field) end
    if redis.call('DECR', KEYS[2 + i]) <= 0 then redis.call('DEL', KEYS[2 + i]) end
  end
end
return 1
"""
)

RENEW = (
    _LEASE
    + """
-- Hold the lease and reap the others. Returns 1 when this process had been reaped and
-- its counts were added back, else 0.
local back = hold()
reap()
if back then return 1 end
return 0
"""
)

RELEASE = (
    _LEASE
    + """
-- This process stops counting: its counts leave the counters (unless reaped already,
-- which took them out), and its hash and lease are gone. Returns 1.
if redis.call('ZSCORE', leases, id) then
  shift(own, -1)
  redis.call('ZREM', leases, id)
end
redis.call('DEL', own)
return 1
"""
)


class ConnectionLeases:
    """One process's connection counts on Redis, held under a lease; see the module.

    :meth:`open` and :meth:`close` hand back the script call to run (on its own with
    ``await call.script(keys=call.keys, args=call.plain_args)``, or in a batch with
    :class:`~policy_engine.state.redis_pipeline.Pipeline`) and the function that turns its
    reply into the answer. Nothing is kept in the process: Redis holds its counts.
    """

    def __init__(
        self,
        client: RedisClient,
        prefix: str,
        *,
        process_id: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        keep_reaped: float = DEFAULT_KEEP_REAPED,
    ) -> None:
        if not (0 < lease_ttl < math.inf) or not (0 <= keep_reaped < math.inf):
            raise ValueError(
                f"lease_ttl must be > 0 and keep_reaped >= 0, both finite, "
                f"got {lease_ttl}, {keep_reaped}"
            )
        self.process_id = process_id or uuid.uuid4().hex
        self.lease_ttl = lease_ttl
        self._base = f"{{{prefix}:conn}}:"
        self._lease_keys = [f"{self._base}leases", f"{self._base}proc:{self.process_id}"]
        self._lease_args: list[Arg] = [
            self.process_id,
            max(1, math.ceil(lease_ttl * 1000)),
            math.ceil(keep_reaped * 1000),
            self._base,
            _REAP_LIMIT,
        ]
        register = client.register_script
        self._open = register(OPEN)
        self._close = register(CLOSE)
        self._renew = register(RENEW)
        self._release = register(RELEASE)

    def __repr__(self) -> str:
        return f"ConnectionLeases({self._base[1:-2]!r}, process_id={self.process_id!r})"

    def open(self, limits: ConnectionLimits) -> tuple[Call, Callable[[Any], str | None]]:
        """Count a new connection unless a ceiling is reached: the call, and its answer
        (the ceiling reached, ``max_total``, ``max_per_user`` or ``max_per_ip``, or None).

        A connection without a user is not counted per user, as in the other stores.
        """
        counted = [
            ("total", limits.max_total, "max_total"),
            (f"user:{limits.user}", limits.max_per_user, "max_per_user"),
            (f"ip:{limits.ip}", limits.max_per_ip, "max_per_ip"),
        ]
        if not limits.user:
            del counted[1]
        fields = [field for field, _, _ in counted]
        ceilings = ["" if ceiling is None else str(ceiling) for _, ceiling, _ in counted]
        names = [name for _, _, name in counted]

        def reached(reply: Any) -> str | None:
            return None if reply is None else names[int(reply) - 1]

        return self._call(self._open, fields, [*fields, *ceilings]), reached

    def close(self, user: str, ip: str) -> tuple[Call, Callable[[Any], None]]:
        """Release a connection that :meth:`open` counted: the call, and its (empty) answer."""
        fields = ["total", f"user:{user}", f"ip:{ip}"] if user else ["total", f"ip:{ip}"]
        return self._call(self._close, fields, fields), _nothing

    async def renew(self) -> bool:
        """Hold the lease for ``lease_ttl`` more and reap the leases that have run out.

        True when this process had been reaped (it was paused past its lease) and its
        connections were counted again.
        """
        call = self._call(self._renew, [], [])
        with _answering("renew"):
            return bool(await call.script(keys=call.keys, args=call.plain_args))

    async def run_renewals(self) -> None:
        """Renew every third of ``lease_ttl`` until cancelled.

        A renewal that fails (Redis does not answer) is tried again at the next: the lease
        has two more chances before it runs out, and a process reaped meanwhile counts
        again at its next call.
        """
        while True:
            with contextlib.suppress(StoreError):
                await self.renew()
            await asyncio.sleep(self.lease_ttl / 3)

    async def release_all(self) -> None:
        """Stop counting this process's connections: at shutdown, after the renewals."""
        call = self._call(self._release, [], [])
        with _answering("release_all"):
            await call.script(keys=call.keys, args=call.plain_args)

    def _call(self, script: AsyncScript, fields: list[str], extra: list[str]) -> Call:
        keys = [*self._lease_keys, *(self._base + field for field in fields)]
        return Call(script, keys, [*self._lease_args, *extra])


def _nothing(_reply: Any) -> None:
    return None


@contextlib.contextmanager
def _answering(operation: str) -> Iterator[None]:
    """Turn every failure to reach Redis into StoreError, as the store does."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise StoreError(f"redis connections: {operation} failed: {exc!r}") from exc
