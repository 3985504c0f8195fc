"""The Redis state store: processes on one machine or many share limits and breakers.

It answers every :class:`~policy_engine.state.protocol.StateStore` call as
:class:`~policy_engine.state.memory.MemoryStore` does, atomically across every process using
the same Redis, and turns every Redis failure into :class:`~policy_engine.errors.StoreError`
within its socket timeout, so the engine applies the policy's ``on_store_error`` instead of
waiting. Nothing about a connection is cached between calls: once Redis answers again, the
next call works (redis-py reconnects, to the master the Sentinels name now; the pipeline
reloads a script a restarted server forgot, and reads a cluster's slots again after a
failure).

Every decision is one Lua script that Redis runs whole: all the rate limits an event meets
(:mod:`policy_engine.state.redis_limits`), a breaker's permit, outcome or release
(:mod:`policy_engine.state.redis_breakers`), a connection's count, a failed sign-in, a
replay append. Each script is a transcription of the pure algorithm the memory store runs
(:mod:`policy_engine.algorithms`), checked against it by property tests. There is no
optimistic retry to run out of: a burst on one key from any number of processes is judged
one request at a time, and the limit holds exactly. Script calls made at about the same
time go to Redis as one pipeline (:mod:`policy_engine.state.redis_pipeline`), and keys a
limit refused are answered locally until their ``retry_after``
(:mod:`policy_engine.state.near_cache`).

Rate limits and breakers decide on Redis's clock (``TIME``; on a cluster, the clock of the
node that holds the key), so processes need no clock agreement; ``server_clock=False``
makes them decide at the callers' ``now`` instead (the tests compare the two stores on the
same instants that way). Replay buffers and sign-in failures are timed by the callers'
wall clock (``time.time()``).

The store runs on one Redis, on a Redis Cluster, or on the master a set of Sentinels
names (:mod:`policy_engine.state.redis_clients` reads the URLs). The keys, listed in
:mod:`policy_engine.state.redis_scripts`, carry hash tags so that every script's keys
share a slot; only the rate limits of one event can be in several slots, and a cluster
then judges them by peek and commit (:mod:`policy_engine.state.redis_limits`), all or
none except in a race it describes. Rate-limit keys are bounded by their TTLs rather than
``max_keys`` per rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from policy_engine.algorithms import ratelimit
from policy_engine.algorithms.breaker import BreakerState, Permit, Transition
from policy_engine.algorithms.ratelimit import CombinedDecision
from policy_engine.errors import StoreError
from policy_engine.language.model import CircuitBreakerSpec, RateLimitSpec
from policy_engine.state import redis_scripts as scripts
from policy_engine.state.codec import decode_payload, encode_payload
from policy_engine.state.near_cache import OverLimitCache
from policy_engine.state.protocol import FOREVER, ConnectionLimits, ReplayedEvent
from policy_engine.state.redis_breakers import RedisBreakers
from policy_engine.state.redis_check_then_acquire import CheckThenAcquire
from policy_engine.state.redis_clients import Connected, RedisClient, connect, store_options
from policy_engine.state.redis_connections import DEFAULT_LEASE_TTL, ConnectionLeases
from policy_engine.state.redis_limits import RedisRateLimits
from policy_engine.state.redis_outcomes import OutcomeBatches
from policy_engine.state.redis_pipeline import Call, Pipeline
from policy_engine.state.redis_wire import wire_for

_AUTH_FAILURES_KEPT = 1000
"""The newest failures kept per key, as many as the memory store keeps."""

_ID_RETENTION_FACTOR = 2.0
"""A stream's last id outlives its last event by this many times ``retain``.

Beyond the reconnection window, so a client that can still recover finds the ids going
on; bounded by it, since stream names are the clients' to choose. As in the memory store
(:data:`policy_engine.state.replay_buffers.ID_RETENTION_FACTOR`).
"""

_SWEEP_LIMIT = 256
"""Idle replay buffers dropped per append at most, so one script never runs long."""


class RedisStore:
    """The shared :class:`~policy_engine.state.protocol.StateStore`, in Redis.

    ``url`` is a redis-py URL (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster's
    (``redis+cluster://``) or Sentinels' (``redis+sentinel://``): see
    :mod:`policy_engine.state.redis_clients`. Query options such as ``socket_timeout``
    override the defaults here. A ``client`` passed in (a ``Redis`` or a ``RedisCluster``)
    is used as is, with its own timeouts, and left open by :meth:`close`. ``socket_timeout``
    bounds connecting and every reply, so a Redis that is gone fails a call within it;
    redis-py's own retries are off, since a command retried after a lost reply could
    count twice. ``prefix`` starts every key and may not hold braces (they would change
    the keys' hash tags). ``lease_ttl``, ``pipeline_window`` and ``pipeline_limit`` may
    also be set in the URL's query (``?lease_ttl=10``), over the arguments.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "policy-engine",
        client: RedisClient | None = None,
        socket_timeout: float = 0.5,
        server_clock: bool = True,
        pipeline_window: float = 0.0,
        pipeline_limit: int = 128,
        near_cache: bool = True,
        lease_ttl: float = DEFAULT_LEASE_TTL,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"a store prefix holds no braces, got {prefix!r}")
        self.url = url
        self.prefix = prefix
        redis_url, options = store_options(url)
        lease_ttl = options.get("lease_ttl", lease_ttl)
        pipeline_window = options.get("pipeline_window", pipeline_window)
        pipeline_limit = int(options.get("pipeline_limit", pipeline_limit))
        self._connected: Connected | None = None
        if client is None:
            self._connected = connect(redis_url, socket_timeout=socket_timeout)
            client = self._connected.client
        self._client = client
        self.server_clock = server_clock
        # A plain Redis carries the scripts over one connection of the store's own
        # (redis_wire); a cluster, Sentinel or TLS over redis-py's.
        self._wire = wire_for(client, socket_timeout)
        self._pipeline = Pipeline(
            client, window=pipeline_window, limit=pipeline_limit, wire=self._wire
        )
        by_slot = isinstance(client, RedisCluster)
        self._limits = RedisRateLimits(client, prefix, by_slot=by_slot)
        self._breakers = RedisBreakers(self._client, prefix)
        self._outcomes = OutcomeBatches(self._breakers, self._pipeline.run)
        self._check_then_acquire = (
            None if by_slot else CheckThenAcquire(self._client, self._limits, self._breakers)
        )
        self._connections = ConnectionLeases(self._client, prefix, lease_ttl=lease_ttl)
        self._renewing: asyncio.Task[None] | None = None
        self._over_limit = OverLimitCache() if near_cache else None
        register = self._client.register_script
        self._record_auth_failure = register(scripts.RECORD_AUTH_FAILURE)
        self._auth_failures = register(scripts.AUTH_FAILURES)
        self._append_replay = register(scripts.APPEND_REPLAY)
        self._replay_since = register(scripts.REPLAY_SINCE)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    # -- rate limits -----------------------------------------------------------------------

    def refused_nearby(self, checks: Sequence[tuple[RateLimitSpec, str]], now: float) -> bool:
        """Whether the near cache refuses these checks without asking Redis (a peek)."""
        near = self._over_limit
        if near is None:
            return False
        return near.holds(checks, time.monotonic() if self.server_clock else now)

    async def check_rate_limits(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float
    ) -> CombinedDecision:
        """Judge every (rule, key) together, in one script unless a cluster holds them in
        several slots; consume from all or none (see :mod:`~policy_engine.state.redis_limits`
        for the one race a cluster leaves).

        A key refused within its ``retry_after`` is refused again here without asking
        Redis (the near cache): it cannot pass before then, whoever else spends from it.
        """
        if not checks:
            return ratelimit.check_all((), now)[0]
        near = self._over_limit
        local_now = time.monotonic() if self.server_clock else now
        refused = near.refusal(checks, local_now) if near is not None else None
        if refused is not None:
            return refused
        with _answering("check_rate_limits"):
            decision = await self._limits.judge(checks, self._now(now), self._pipeline.run)
        if not decision.allowed and near is not None:
            near.remember(checks, decision, local_now)
        return decision

    async def check_rate_limits_then_acquire(
        self,
        groups: Sequence[Sequence[tuple[RateLimitSpec, str]]],
        spec: CircuitBreakerSpec,
        now: float,
    ) -> tuple[list[CombinedDecision], Permit | None]:
        """Each group of limits judged as :meth:`check_rate_limits` judges it and, when the
        first group admits (it may be empty), a permit from ``spec``'s breaker: one script
        for them all. The permit is None when the first group refused (none was taken).
        On a cluster (the keys in different slots) they are asked one after the other."""
        near = self._over_limit
        local_now = time.monotonic() if self.server_clock else now
        cached = [
            near.refusal(checks, local_now) if near is not None and checks else None
            for checks in groups
        ]
        combined = self._check_then_acquire
        if combined is None or cached[0] is not None:
            decisions = [
                refused or await self.check_rate_limits(checks, now)
                for checks, refused in zip(groups, cached, strict=True)
            ]
            allowed = decisions[0].allowed
            return decisions, (await self.breaker_acquire(spec, now)) if allowed else None
        asked = [() if refused else checks for checks, refused in zip(groups, cached, strict=True)]
        call, read = combined.call(asked, spec, self._now(now))
        with _answering("check_rate_limits_then_acquire"):
            decisions, permit = read(await self._pipeline.run(call))
        for at, refused in enumerate(cached):
            if refused is not None:
                decisions[at] = refused
            elif near is not None and not decisions[at].allowed:
                near.remember(groups[at], decisions[at], local_now)
        return decisions, permit

    # -- circuit breakers ------------------------------------------------------------------

    async def breaker_acquire(self, spec: CircuitBreakerSpec, now: float) -> Permit:
        call, read = self._breakers.acquire(spec, self._now(now))
        with _answering("breaker_acquire"):
            return read(await self._pipeline.run(call))

    async def breaker_record(
        self, spec: CircuitBreakerSpec, now: float, *, failed: bool, duration: float
    ) -> Transition | None:
        answer = self._outcomes.record(spec, self._now(now), failed=failed, duration=duration)
        with _answering("breaker_record"):
            return await answer

    async def breaker_release(self, spec: CircuitBreakerSpec) -> None:
        call, read = self._breakers.release(spec)
        with _answering("breaker_release"):
            read(await self._pipeline.run(call))

    async def fetch_breaker_state(self, name: str) -> BreakerState:
        """The breaker's stored state (closed and empty when none): for status pages."""
        call, read = self._breakers.fetch_state(name)
        with _answering("fetch_breaker_state"):
            return read(await self._pipeline.run(call))

    def answer_within(self, seconds: float) -> bool:
        """Bound every script call (connecting included) by ``seconds``, the policy's
        ``store_timeout``, and say whether it can: over its own connection (a plain Redis)
        one timer serves every call in flight; redis-py's connections cannot."""
        wire = self._wire
        if wire is None:
            return False
        wire.timeout = wire.connect_timeout = seconds
        return True

    def _now(self, now: float) -> float | None:
        """The time a script decides at: None (Redis's own clock) unless told otherwise."""
        return None if self.server_clock else now

    # -- connections -----------------------------------------------------------------------

    async def open_connection(self, limits: ConnectionLimits) -> str | None:
        """Count a connection under this process's lease (renewed in the background from
        the first one on), unless a ceiling is reached; the ceiling hit, if any."""
        self._keep_lease()
        call, read = self._connections.open(limits)
        with _answering("open_connection"):
            return read(await self._pipeline.run(call))

    async def close_connection(self, user: str, ip: str) -> None:
        call, read = self._connections.close(user, ip)
        with _answering("close_connection"):
            read(await self._pipeline.run(call))

    def _keep_lease(self) -> None:
        renewing = self._renewing
        if renewing is None or renewing.done():
            self._renewing = asyncio.ensure_future(self._connections.run_renewals())

    # -- authentication failures -----------------------------------------------------------

    async def record_auth_failure(self, key: str, window: float, now: float) -> int:
        args: list[str | int] = [
            _number(now),
            _number(now - window),
            uuid.uuid4().hex,
            _ttl_ms(window),
            _AUTH_FAILURES_KEPT,
        ]
        with _answering("record_auth_failure"):
            call = Call(self._record_auth_failure, [self._auth_key(key)], args)
            count = await self._pipeline.run(call)
        return int(count)

    async def auth_failures(self, key: str, window: float, now: float) -> tuple[int, float]:
        with _answering("auth_failures"):
            call = Call(self._auth_failures, [self._auth_key(key)], [_number(now - window)])
            count, newest = await self._pipeline.run(call)
        return (int(count), float(newest)) if count else (0, 0.0)

    async def clear_auth_failures(self, key: str) -> None:
        with _answering("clear_auth_failures"):
            await self._client.delete(self._auth_key(key))

    def _auth_key(self, key: str) -> str:
        return f"{self.prefix}:auth:{key}"

    # -- replay buffers --------------------------------------------------------------------

    async def append_replay(
        self,
        stream: str,
        event: str,
        data: Any,
        limit: int,
        now: float,
        *,
        retain: float = FOREVER,
        max_bytes: int | None = None,
        max_total_bytes: int | None = None,
    ) -> int:
        """Buffer an outgoing event for replay; returns its id (increasing per stream).

        Streams with no event for ``retain`` seconds are dropped, as in the memory store,
        by the next append (to any stream) whose ``now`` is past that, and by their TTL.
        Bytes are counted as stored (the JSON of each entry); the total is shared by every
        process using this Redis, and one append evicts at most ``_SWEEP_LIMIT`` entries
        of other streams.
        """
        try:
            rest = json.dumps([now, event, encode_payload(data)], separators=(",", ":"))[1:]
        except (TypeError, ValueError) as exc:
            raise StoreError(f"redis store: cannot buffer {event!r}: {exc}") from exc
        finite = math.isfinite(retain)
        args: list[str | int] = [
            stream,
            rest,
            limit,
            _number(now),
            _number(now - retain) if finite else "",
            _ttl_ms(retain),
            _ttl_ms(_ID_RETENTION_FACTOR * retain),
            self._replay_key(""),
            _SWEEP_LIMIT,
            _ceiling(max_bytes),
            _ceiling(max_total_bytes),
        ]
        keys = [
            self._replay_key(stream),
            self._replay_id_key(stream),
            f"{self._replay_tag}:streams",
            f"{self._replay_tag}:bytes",
            f"{self._replay_tag}:total",
        ]
        with _answering("append_replay"):
            return int(await self._pipeline.run(Call(self._append_replay, keys, args)))

    async def replay_since(
        self, stream: str, after_id: int, max_age: float, now: float
    ) -> list[ReplayedEvent] | None:
        """Events after ``after_id``, in order; None when they cannot all be replayed."""
        keys = [self._replay_key(stream), self._replay_id_key(stream)]
        with _answering("replay_since"):
            reply = await self._pipeline.run(Call(self._replay_since, keys, [after_id]))
        status = reply[0]
        if status == -1:  # never seen, or its last id outlived by far
            return [] if after_id <= 0 else None
        if status == 0:
            return []
        if status == -2:
            return None
        try:
            missed = [json.loads(entry) for entry in reply[1]]
            if now - float(missed[0][1]) > max_age:
                return None
            return [
                ReplayedEvent(int(event_id), event, decode_payload(data))
                for event_id, _, event, data in missed
            ]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise StoreError(f"redis store: unreadable replay buffer {keys[0]!r}") from exc

    @property
    def _replay_tag(self) -> str:
        """What every replay key starts with: one hash tag, so one slot, for them all."""
        return f"{{{self.prefix}:replay}}"

    def _replay_key(self, stream: str) -> str:
        return f"{self._replay_tag}:stream:{stream}"

    def _replay_id_key(self, stream: str) -> str:
        return f"{self._replay_tag}:id:{stream}"

    # -- lifecycle -------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise StoreError unless Redis answers: for readiness checks."""
        with _answering("ping"):
            await self._pipeline.ping()

    async def close(self) -> None:
        """Stop renewing this process's lease and give back what it still counts, then close
        the connections, unless the client was passed in (its owner closes it)."""
        renewing, self._renewing = self._renewing, None
        if renewing is not None:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            with contextlib.suppress(StoreError):
                await self._connections.release_all()
        await self._outcomes.aclose()
        if self._wire is not None:
            await self._wire.aclose()
        if self._connected is not None:
            with _answering("close"):
                await self._connected.aclose()


class _answering:  # noqa: N801 (used as a function: ``with _answering(operation):``)
    """Turn every failure to reach Redis into StoreError (timeouts are OSErrors too; a
    cluster whose nodes cannot be found raises RedisClusterException). A class, not a
    generator: it wraps every call of every shared decision."""

    __slots__ = ("operation",)

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, trace: object) -> None:
        if isinstance(exc, (RedisError, RedisClusterException, OSError)):
            raise StoreError(f"redis store: {self.operation} failed: {exc!r}") from exc


def _ttl_ms(seconds: float) -> int:
    """A TTL in whole milliseconds, rounded up and at least 1; 0 (none) for forever."""
    if not math.isfinite(seconds):
        return 0
    return max(1, math.ceil(seconds * 1000))


def _number(value: float) -> str:
    """A time as Redis parses it back to the very same float (scores, bounds)."""
    return repr(float(value))


def _ceiling(value: int | None) -> str:
    return "" if value is None else str(value)
