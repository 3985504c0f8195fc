"""The decision engine: one compiled policy, the guarded state, and a verdict per hook.

The engine knows nothing of Socket.IO. The adapter hands it plain-dict contexts (``conn``,
``claims``, ``event``, ``load``) and turns its :class:`Decision` into protocol actions.
Rules are judged in an order that refuses cheaply first. An event: its size, shedding (the
server is overloaded: do as little as possible), rate limits, then what costs in
proportion to the payload (its schema, authorization), so a client over its limit pays
for nothing else. A connect: shedding, authentication throttling, authorization, rate
limits, and finally the counters a successful connect increments. Whatever a condition in
a converting CEL engine reads of the client's data is checked first
(:mod:`policy_engine.core.payload_view`). Each rule group lives in its own module; this
class holds the per-process state they share and walks them.

A rule in shadow mode is judged exactly like an enforced one, but only named in
``Decision.shadowed``: it refuses nothing. Every method takes an optional
:class:`~policy_engine.core.recorder.Recorder`: ``explain`` is this same walk, recorded.

The event hooks (:mod:`policy_engine.core.events`) are judged synchronously as far as the
state allows; what needs the shared store is awaited and then concluded by the same code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from policy_engine.core import auth_throttle
from policy_engine.core.authorization import authorize
from policy_engine.core.breakers import NO_GUARD, BreakerGuard
from policy_engine.core.classify import Classification, classify, error_context
from policy_engine.core.connections import count_connection, priority
from policy_engine.core.contexts import conn_context, event_context
from policy_engine.core.decision import ALLOW, Decision
from policy_engine.core.event_judge import judges_for
from policy_engine.core.events import EventHooks, EventVerdict, PendingEvent, finish
from policy_engine.core.payload import ClientPayload
from policy_engine.core.payload_view import handshake_checked, handshake_refusal, views_for
from policy_engine.core.rate_limits import RateLimits
from policy_engine.core.recorder import NULL_RECORDER, Recorder, TraceRecorder
from policy_engine.core.shedding import Shedding
from policy_engine.core.tap import DecisionTap
from policy_engine.language.contexts import CONN, EVENT, LOAD, Hook
from policy_engine.language.model import PolicySet
from policy_engine.state.guarded import GuardedStore
from policy_engine.state.health import StoreHealth
from policy_engine.state.memory import MemoryStore, StateStore

__all__ = [
    "NO_GUARD",
    "BreakerGuard",
    "Engine",
    "EventVerdict",
    "PendingEvent",
    "conn_context",
    "event_context",
]

Clock = Callable[[], float]


class Engine(EventHooks):
    """Applies one :class:`PolicySet` at a time; ``swap`` replaces it atomically."""

    def __init__(
        self,
        policy: PolicySet,
        store: StateStore | None = None,
        *,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
        local: MemoryStore | None = None,
    ) -> None:
        self.state = GuardedStore(store, local)
        self.clock = clock or self.state.default_clock()
        self.rand = rand
        # Replaced by each load sample, never changed in place: the shedding rules armed
        # under it are worked out once per sample.
        self.load: dict[str, Any] = LOAD.defaults()
        self._shedding = Shedding()
        self._rates = RateLimits()
        # Told every decision and disconnect (the decision log, the canary); None: nobody.
        self.tap: DecisionTap | None = None
        self.swap(policy)

    @property
    def store(self) -> StateStore:
        return self.state.store

    @property
    def local(self) -> MemoryStore:
        return self.state.local

    @property
    def store_health(self) -> StoreHealth:
        return self.state.health

    def swap(self, policy: PolicySet) -> None:
        """Install a new policy; state is keyed by rule name, so unchanged rules keep theirs."""
        self.policy = policy
        self.state.configure(policy.defaults.store_timeout, policy.defaults.on_store_error)
        self._shedding.keep_clocks_of(policy)
        self._payload_views = views_for(policy)
        self._judges, self._other_judge = judges_for(
            policy,
            None if self.state.shared else self.state.local,
            self._rates,
            self._payload_views,
        )
        self._handshake_checked = handshake_checked(policy)

    # -- connect -----------------------------------------------------------------------------

    async def on_connect(
        self,
        conn: dict[str, Any],
        claims: Mapping[str, Any],
        *,
        explain: bool = False,
        recorder: Recorder | None = None,
    ) -> Decision:
        """Judge a handshake; when allowed, the connection is counted until on_disconnect."""
        policy, state = self.policy, self.state
        recorder = _recorder(explain, recorder)
        shadowed: list[str] = []
        activation = {"conn": conn, "claims": claims, "load": self.load}
        index = policy.by_hook
        if self._handshake_checked:
            invalid = handshake_refusal(conn, claims)
            if invalid is not None:
                return self._tapped(conn, claims, finish(invalid, shadowed, recorder))
        refusal = (
            self._shedding.shed(
                policy,
                index.shedding[Hook.CONNECT],
                activation,
                None,
                self.clock,
                recorder,
                shadowed,
            )
            or await auth_throttle.throttle(policy, state, conn, self.clock(), recorder)
            or authorize(
                policy,
                index.authorization[Hook.CONNECT],
                Hook.CONNECT,
                activation,
                recorder,
                shadowed,
            )
            or await self._rate_limits(
                index.rate_limits[Hook.CONNECT], activation, recorder, shadowed
            )
        )
        if refusal is None:
            conn["priority"] = priority(policy, activation)
            refusal = await count_connection(policy, state, conn, recorder)
        return self._tapped(conn, claims, finish(refusal or ALLOW, shadowed, recorder))

    def _tapped(
        self, conn: Mapping[str, Any], claims: Mapping[str, Any], decision: Decision
    ) -> Decision:
        tap = self.tap
        if tap is not None:
            tap.judged(Hook.CONNECT, conn, claims, None, self.load, decision)
        return decision

    async def on_disconnect(self, conn: Mapping[str, Any]) -> None:
        tap = self.tap
        if tap is not None:
            tap.disconnected(conn)
        self._rates.forget(conn["sid"])
        await self.state.close_connection(conn["sid"], conn["user_id"], conn["ip"])

    async def record_auth_failure(self, conn: Mapping[str, Any]) -> int:
        """Count a failed authentication against the client's IP and user."""
        return await auth_throttle.record_auth_failure(self.policy, self.state, conn, self.clock())

    async def clear_auth_failures(self, conn: Mapping[str, Any]) -> None:
        await auth_throttle.clear_auth_failures(self.policy, self.state, conn)

    def counts_as_auth_failure(self, classification: Classification) -> bool:
        return auth_throttle.counts_as_auth_failure(self.policy, classification)

    # -- errors ------------------------------------------------------------------------------

    def on_error(
        self,
        exc: BaseException,
        hook: Hook,
        conn: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
        *,
        recorder: Recorder | None = None,
    ) -> tuple[Classification, ClientPayload, dict[str, Any]]:
        """Classify an exception: the classification, its client payload, the error context."""
        error = error_context(exc, hook.value)
        activation = {
            "conn": conn if conn is not None else CONN.defaults(),
            "claims": claims if claims is not None else {},
            "event": event if event is not None else EVENT.defaults(),
            "error": error,
            "hook": hook.value,
        }
        classification = classify(self.policy, activation, recorder or NULL_RECORDER)
        return classification, classification.payload(), error

    # -- load shedding of connections --------------------------------------------------------

    def connections_to_shed(
        self, connections: Iterable[Mapping[str, Any]]
    ) -> list[tuple[str, ClientPayload]]:
        """On a sampler tick: the connections to disconnect now, lowest priority first."""
        return self._shedding.connections_to_shed(self.policy, self.load, connections, self.clock)


def _recorder(explain: bool, recorder: Recorder | None) -> Recorder:
    if recorder is not None:
        return recorder
    return TraceRecorder() if explain else NULL_RECORDER
