"""The Redis state store: processes on one machine or many share limits and breakers.

It answers every :class:`~policy_engine.state.protocol.StateStore` call exactly as
:class:`~policy_engine.state.memory.MemoryStore` does for the same calls, atomically across every
process using the same Redis, and turns every Redis failure into
:class:`~policy_engine.errors.StoreError` within its socket timeout, so the engine applies
the policy's ``on_store_error`` instead of waiting. Nothing about a connection is cached
between calls: once Redis answers again, the next call works (redis-py reconnects, and
reloads a script that a restarted server forgot).

Rate limits and breakers keep one source of truth, the pure strategies in
:mod:`policy_engine.algorithms.ratelimit` and :mod:`policy_engine.algorithms.breaker`: a call
reads the states with one ``MGET``, decides in Python, and writes with one compare-and-set
script that stores the new states only if every key still holds what was read; otherwise it decides
again on the values the script hands back (a bounded number of times, then StoreError).
Connection counts, authentication failures and replay buffers are each one Lua script.

The keys are listed in :mod:`policy_engine.state.redis_scripts`. States are JSON with type
tags (:mod:`policy_engine.state.codec`). The scheme is flat, without hash tags: the scripts
touch several keys, and the replay script deletes idle buffers it finds in the index, so
the store needs one Redis (with replicas or Sentinel for availability), not Redis Cluster.

Times are the callers' ``now``, compared with each other and never with Redis's clock:
every process sharing a store must pass wall-clock seconds (``time.time()``), not its own
``time.monotonic()``. Redis's clock only measures TTLs, which remove state once it is
empty (rate limits) or idle (replay buffers, authentication failures) and never earlier.

Two bounds of the memory store have no counterpart here: rate-limit keys are bounded by
their TTLs rather than ``max_keys`` per rule, and a connection counted by a process that
dies without closing it stays counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from policy_engine.algorithms import breaker, ratelimit
from policy_engine.algorithms.breaker import BreakerState, Permit, Transition
from policy_engine.algorithms.ratelimit import CombinedDecision, RateState
from policy_engine.errors import StoreError
from policy_engine.language.model import CircuitBreakerSpec, RateLimitSpec
from policy_engine.state import redis_scripts as scripts
from policy_engine.state.codec import (
    StateCodecError,
    decode_payload,
    dumps_state,
    encode_payload,
    loads_state,
)
from policy_engine.state.near_cache import OverLimitCache
from policy_engine.state.protocol import FOREVER, ConnectionLimits, ReplayedEvent
from policy_engine.state.redis_limits import RedisRateLimits
from policy_engine.state.redis_pipeline import Pipeline

T = TypeVar("T")

_CLOSED = BreakerState()

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

_KNOWN_LIMIT = 100_000
"""Keys whose last value is remembered at most (see ``RedisStore._decide``)."""

_UNREAD = object()
"""A key whose value this process has not read or written yet."""

_RETRY_BASE = 0.001
_RETRY_CAP = 0.016

Raw = bytes | str | None
"""A value as ``MGET`` returns it (None: no such key)."""

Write = tuple[str, int]
"""What to store in one key: the value ('' deletes the key) and a TTL in ms (0: none)."""

Step = Callable[[list[Raw]], tuple[T, Sequence[Write] | None]]
"""Decide on the values read: the answer, and the writes it needs (None: nothing to write)."""


class RedisStore:
    """The shared :class:`~policy_engine.state.protocol.StateStore`, in one Redis.

    ``url`` is a redis-py URL (``redis://``, ``rediss://``, ``unix://``; query options such
    as ``socket_timeout`` override the defaults here). A ``client`` passed in is used as
    is, with its own timeouts, and left open by :meth:`close`. ``socket_timeout`` bounds
    connecting and every reply, so a Redis that is gone fails a call within it; redis-py's
    own retries are off, since a command retried after a lost reply could count twice.
    ``max_attempts`` bounds the compare-and-set rounds of one rate-limit or breaker call.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "policy-engine",
        client: Redis | None = None,
        socket_timeout: float = 0.5,
        max_attempts: int = 10,
        server_clock: bool = True,
        pipeline_window: float = 0.0,
        pipeline_limit: int = 128,
        near_cache: bool = True,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.url = url
        self.prefix = prefix
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        )
        self._max_attempts = max_attempts
        self.server_clock = server_clock
        self._pipeline = Pipeline(self._client, window=pipeline_window, limit=pipeline_limit)
        self._limits = RedisRateLimits(self._client, prefix)
        self._over_limit = OverLimitCache() if near_cache else None
        # The values this process last read or wrote, per key (see _decide).
        self._known: dict[str, Raw] = {}
        register = self._client.register_script
        self._compare_and_set = register(scripts.COMPARE_AND_SET)
        self._open_connection = register(scripts.OPEN_CONNECTION)
        self._close_connection = register(scripts.CLOSE_CONNECTION)
        self._record_auth_failure = register(scripts.RECORD_AUTH_FAILURE)
        self._auth_failures = register(scripts.AUTH_FAILURES)
        self._append_replay = register(scripts.APPEND_REPLAY)
        self._replay_since = register(scripts.REPLAY_SINCE)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    # -- rate limits -----------------------------------------------------------------------

    async def check_rate_limits(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float
    ) -> CombinedDecision:
        """Judge every (rule, key) together in one script; consume from all or none.

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
        call, read = self._limits.check(checks, None if self.server_clock else now)
        with _answering("check_rate_limits"):
            decision = read(await self._pipeline.run(call))
        if not decision.allowed and near is not None:
            near.remember(checks, decision, local_now)
        return decision

    # -- circuit breakers ------------------------------------------------------------------

    async def breaker_acquire(self, spec: CircuitBreakerSpec, now: float) -> Permit:
        def step(values: list[Raw]) -> tuple[Permit, list[Write] | None]:
            prior = _breaker_state(values[0])
            permit, state = breaker.acquire(spec, prior, now)
            return permit, _breaker_write(prior, state)

        with _answering("breaker_acquire"):
            return await self._decide([self._breaker_key(spec.name)], step)

    async def breaker_record(
        self, spec: CircuitBreakerSpec, now: float, *, failed: bool, duration: float
    ) -> Transition | None:
        def step(values: list[Raw]) -> tuple[Transition | None, list[Write] | None]:
            prior = _breaker_state(values[0])
            state, transition = breaker.record(spec, prior, now, failed=failed, duration=duration)
            return transition, _breaker_write(prior, state)

        with _answering("breaker_record"):
            return await self._decide([self._breaker_key(spec.name)], step)

    async def breaker_release(self, spec: CircuitBreakerSpec) -> None:
        def step(values: list[Raw]) -> tuple[None, list[Write] | None]:
            prior = _breaker_state(values[0])
            return None, _breaker_write(prior, breaker.release(prior))

        with _answering("breaker_release"):
            await self._decide([self._breaker_key(spec.name)], step)

    async def fetch_breaker_state(self, name: str) -> BreakerState:
        """The breaker's stored state (closed and empty when none): for status pages."""
        with _answering("fetch_breaker_state"):
            return _breaker_state(await self._client.get(self._breaker_key(name)))

    def _breaker_key(self, rule: str) -> str:
        return f"{self.prefix}:cb:{rule}"

    # -- the compare-and-set loop ----------------------------------------------------------

    async def _decide(self, keys: list[str], step: Step[T]) -> T:
        """Read ``keys``, decide with ``step`` and write its states if nobody came between.

        The values this process last read or wrote are tried first, without reading: the
        compare-and-set accepts a write only if they are still current, and hands back the
        current values otherwise. A state this process keeps updating (a connection's or a
        conversation's limit, a breaker's window here alone) then costs one round trip, not
        two. A decision that writes nothing is never taken on remembered values: those are
        read first. When another writer came between, decide again on the values the
        script saw: at once the first time, then after a short random pause, so that
        contending callers spread out.
        """
        known = self._known
        remembered = [known.get(key, _UNREAD) for key in keys]
        values: list[Raw] | None = None
        if _UNREAD not in remembered:
            values = remembered  # type: ignore[assignment]
        attempts = 0
        while True:
            if values is None:
                values = list(await self._client.mget(keys))
                self._remember(keys, values)
            answer, writes = step(values)
            if writes is None:
                if values is remembered:
                    values = None  # decide again on what Redis holds now
                    continue
                return answer
            args: list[str | bytes | int] = []
            for value, (new_value, ttl) in zip(values, writes, strict=True):
                args += ["0", ""] if value is None else ["1", value]
                args += [new_value, ttl]
            reply = await self._compare_and_set(keys=keys, args=args)
            if reply[0] == 1:
                self._remember(keys, [value or None for value, _ in writes])
                return answer
            if values is not remembered:
                attempts += 1  # a stale memory of this process's is no contention
            if attempts >= self._max_attempts:
                raise StoreError(
                    f"redis store: state of {keys[0]!r} kept changing under "
                    f"{self._max_attempts} attempts to update it"
                )
            values = list(reply[1:]) + [None] * (len(keys) + 1 - len(reply))
            self._remember(keys, values)
            if attempts > 1:
                delay = min(_RETRY_CAP, _RETRY_BASE * 2 ** (attempts - 2))
                await asyncio.sleep(random.uniform(0.0, delay))

    def _remember(self, keys: list[str], values: Sequence[Raw]) -> None:
        known = self._known
        if len(known) > _KNOWN_LIMIT:
            known.clear()  # a bound, not a cache policy: what is forgotten is read again
        for key, value in zip(keys, values, strict=True):
            known[key] = value

    # -- connections -----------------------------------------------------------------------

    async def open_connection(self, limits: ConnectionLimits) -> str | None:
        args: list[str | int] = [
            _ceiling(limits.max_total),
            _ceiling(limits.max_per_user),
            _ceiling(limits.max_per_ip),
            "1" if limits.user else "0",
        ]
        with _answering("open_connection"):
            reached = await self._open_connection(
                keys=self._connection_keys(limits.user, limits.ip), args=args
            )
        return None if reached is None else _text(reached)

    async def close_connection(self, user: str, ip: str) -> None:
        with _answering("close_connection"):
            await self._close_connection(keys=self._connection_keys(user, ip))

    def _connection_keys(self, user: str, ip: str) -> list[str]:
        base = f"{self.prefix}:conn"
        return [f"{base}:total", f"{base}:user:{user}", f"{base}:ip:{ip}"]

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
            count = await self._record_auth_failure(keys=[self._auth_key(key)], args=args)
        return int(count)

    async def auth_failures(self, key: str, window: float, now: float) -> tuple[int, float]:
        with _answering("auth_failures"):
            count, newest = await self._auth_failures(
                keys=[self._auth_key(key)], args=[_number(now - window)]
            )
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
            f"{self.prefix}:replay:",
            _SWEEP_LIMIT,
            _ceiling(max_bytes),
            _ceiling(max_total_bytes),
        ]
        keys = [
            self._replay_key(stream),
            self._replay_id_key(stream),
            self._replay_index_key(),
            f"{self.prefix}:replay-bytes",
            f"{self.prefix}:replay-total",
        ]
        with _answering("append_replay"):
            return int(await self._append_replay(keys=keys, args=args))

    async def replay_since(
        self, stream: str, after_id: int, max_age: float, now: float
    ) -> list[ReplayedEvent] | None:
        """Events after ``after_id``, in order; None when they cannot all be replayed."""
        keys = [self._replay_key(stream), self._replay_id_key(stream)]
        with _answering("replay_since"):
            reply = await self._replay_since(keys=keys, args=[after_id])
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

    def _replay_key(self, stream: str) -> str:
        return f"{self.prefix}:replay:{stream}"

    def _replay_id_key(self, stream: str) -> str:
        return f"{self.prefix}:replay-id:{stream}"

    def _replay_index_key(self) -> str:
        return f"{self.prefix}:replay-streams"

    # -- lifecycle -------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise StoreError unless Redis answers: for readiness checks."""
        with _answering("ping"):
            await self._client.ping()

    async def close(self) -> None:
        """Close the connections, unless the client was passed in (its owner closes it)."""
        if self._owns_client:
            with _answering("close"):
                await self._client.aclose()


@contextlib.contextmanager
def _answering(operation: str) -> Iterator[None]:
    """Turn every failure to reach Redis into StoreError (timeouts are OSErrors too)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis store: {operation} failed: {exc!r}") from exc


def _stored(raw: Raw) -> RateState | BreakerState | None:
    """A stored state; None for none, or for a value that is not one (it counts as none)."""
    if raw is None:
        return None
    try:
        return loads_state(raw)
    except StateCodecError:
        return None


def _rate_state(raw: Raw) -> RateState | None:
    state = _stored(raw)
    return None if isinstance(state, BreakerState) else state


def _check_one(
    spec: RateLimitSpec, raw: Raw, now: float
) -> tuple[CombinedDecision, list[Write] | None]:
    """One limit alone, on its state as stored (an expired state decides as none)."""
    decision, state = ratelimit.check(spec, _rate_state(raw), now)
    combined = CombinedDecision(decision.allowed, decision.retry_after, spec.name, decision)
    return combined, [_rate_write(spec, state, now)] if decision.allowed else None


def _check_together(
    specs: list[RateLimitSpec], values: list[Raw], now: float
) -> tuple[CombinedDecision, list[Write] | None]:
    """Several limits at once, expired states dropped first; writes only on admission."""
    prior: list[tuple[RateLimitSpec, RateState | None]] = []
    for spec, raw in zip(specs, values, strict=True):
        stored = _rate_state(raw)
        if stored is not None and ratelimit.expires_at(spec, stored) <= now:
            stored = None
        prior.append((spec, stored))
    combined, states = ratelimit.check_all(prior, now)
    if not combined.allowed:
        return combined, None
    writes: list[Write] = []
    for spec, state in zip(specs, states, strict=True):
        if state is None:  # never after an admission; the type allows it
            return combined, None
        writes.append(_rate_write(spec, state, now))
    return combined, writes


def _rate_write(spec: RateLimitSpec, state: RateState, now: float) -> Write:
    """Store ``state`` until it is empty again; delete the key when it already is."""
    expires = ratelimit.expires_at(spec, state)
    if expires <= now:
        return "", 0
    return dumps_state(state), _ttl_ms(expires - now)


def _breaker_state(raw: Raw) -> BreakerState:
    """The stored breaker state; closed and empty for none, or for a value that is not one."""
    state = _stored(raw)
    return state if isinstance(state, BreakerState) else _CLOSED


def _breaker_write(prior: BreakerState, state: BreakerState) -> list[Write] | None:
    """Nothing to write when the strategy handed back the state it was given."""
    return None if state is prior else [(dumps_state(state), 0)]


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
