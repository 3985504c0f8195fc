"""The decision engine: one compiled policy, the state store, and a verdict per hook.

The engine knows nothing of Socket.IO. The adapter hands it plain-dict contexts (``conn``,
``claims``, ``event``, ``load``) and turns its :class:`Decision` into protocol actions.
Rules are judged in an order that refuses cheaply first: shedding (the server is
overloaded: do as little as possible), then payload checks, authorization, rate limits,
and finally the counters that a successful connect increments.

A rule in shadow mode is judged exactly like an enforced one, but only named in
``Decision.shadowed``: it refuses nothing. When the shared store fails, the policy's
``on_store_error`` decides: let through, refuse, or fall back to this process's state.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import fastjsonschema

from policy_engine.algorithms.breaker import Circuit, Permit, Transition
from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision
from policy_engine.core.classify import Classification, classify, error_context
from policy_engine.core.decision import ALLOW, Decision, Outcome, TraceEntry, client_payload
from policy_engine.core.evaluation import evaluate_value, matches
from policy_engine.errors import EvaluationError, StoreError
from policy_engine.language.contexts import CONN, EVENT, LOAD, Hook
from policy_engine.language.model import (
    AuthzRuleSpec,
    BackoffSpec,
    Category,
    CircuitBreakerSpec,
    Effect,
    EvalFailureMode,
    EventPlan,
    Expression,
    Mode,
    PolicySet,
    Priority,
    RateLimitSpec,
    Scope,
    ShedAction,
    SheddingRuleSpec,
    StoreFailureMode,
)
from policy_engine.state.health import StoreHealth
from policy_engine.state.memory import ConnectionLimits, MemoryStore, StateStore

T = TypeVar("T")
Clock = Callable[[], float]


class BreakerGuard(NamedTuple):
    """The permits one event holds while its handler runs (a named tuple: one per event)."""

    permits: tuple[CircuitBreakerSpec, ...]
    started: float
    # Transitions that granting the permits caused (open -> half_open), for the observer.
    transitions: tuple[tuple[str, Transition], ...] = ()


NO_GUARD = BreakerGuard((), 0.0)
_STORE_UNAVAILABLE = "store_unavailable"  # the "ceiling" of a count the store could not make
_STORE_RETRY_AFTER = 1.0  # the retry advice of a refusal because the shared store is down


class EventVerdict(NamedTuple):
    """An event's decision and the breaker permits it holds (None: not asked for yet)."""

    decision: Decision
    guard: BreakerGuard | None


_ALLOWED = EventVerdict(ALLOW, NO_GUARD)


def new_correlation_id() -> str:
    return uuid.uuid4().hex[:16]


def conn_context(**fields: Any) -> dict[str, Any]:
    """A ``conn`` variable with every declared field present; unknown names are refused."""
    context = CONN.defaults()
    for name, value in fields.items():
        if name not in context:
            raise KeyError(f"conn has no field {name!r}")
        context[name] = value
    return context


def event_context(
    name: str, payload: Any = None, *, size_bytes: int = 0, has_ack: bool = False
) -> dict[str, Any]:
    context = EVENT.defaults()
    context.update(name=name, payload=payload, size_bytes=size_bytes, has_ack=has_ack)
    return context


class Engine:
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
        self.policy = policy
        self.local = local or (store if isinstance(store, MemoryStore) else MemoryStore())
        self.store: StateStore = store or self.local
        # Processes sharing a store compare each other's times: they read the wall clock.
        # Alone, this process's monotonic clock is immune to the wall clock's jumps.
        self.clock = clock or (time.monotonic if self.store is self.local else time.time)
        self.rand = rand
        # Replaced by each load sample, never changed in place: the shedding rules armed
        # under it are worked out once per sample (see _armed_shedding).
        self.load: dict[str, Any] = LOAD.defaults()
        self._armed_for: tuple[PolicySet, dict[str, Any]] | None = None
        self._armed: frozenset[str] = frozenset()
        self._condition_since: dict[str, float] = {}
        self.store_health = StoreHealth()
        # Where each open connection was counted (see _count_connection).
        self._counted_in: dict[str, StateStore] = {}
        # Rate-limit keys that read only conn and claims, computed once per connection.
        self._connection_keys: dict[str, dict[tuple[str, str], str]] = {}

    def swap(self, policy: PolicySet) -> None:
        """Install a new policy; state is keyed by rule name, so unchanged rules keep theirs."""
        self.policy = policy
        self._condition_since = {
            name: since
            for name, since in self._condition_since.items()
            if any(rule.name == name for rule in policy.shedding)
        }

    # -- connect -----------------------------------------------------------------------------

    async def on_connect(
        self, conn: dict[str, Any], claims: Mapping[str, Any], *, explain: bool = False
    ) -> Decision:
        """Judge a handshake; when allowed, the connection is counted until on_disconnect."""
        policy = self.policy
        trace: list[TraceEntry] | None = [] if explain else None
        shadowed: list[str] = []
        activation = {"conn": conn, "claims": claims, "load": self.load}
        refusal = (
            self._shed(policy.by_hook.shedding[Hook.CONNECT], activation, None, trace, shadowed)
            or await self._auth_throttle(conn, trace)
            or self._authorize(
                policy.by_hook.authorization[Hook.CONNECT],
                Hook.CONNECT,
                activation,
                trace,
                shadowed,
            )
            or await self._rate_limits(
                policy.by_hook.rate_limits[Hook.CONNECT], activation, trace, shadowed
            )
        )
        if refusal is not None:
            return _finish(refusal, shadowed, trace)
        conn["priority"] = self._priority(activation)
        limits = policy.connections
        if limits.max_total or limits.max_per_user or limits.max_per_ip:
            ceiling = await self._count_connection(
                conn["sid"],
                ConnectionLimits(
                    conn["user_id"],
                    conn["ip"],
                    limits.max_total,
                    limits.max_per_user,
                    limits.max_per_ip,
                ),
            )
            if trace is not None:
                trace.append(
                    TraceEntry(
                        "connections",
                        "limits",
                        ceiling is not None,
                        "reject" if ceiling else "allow",
                        {"ceiling": ceiling},
                    )
                )
            if ceiling is not None:
                message = (
                    "Connection limits cannot be checked right now; retry shortly."
                    if ceiling == _STORE_UNAVAILABLE
                    else f"Connection limit reached ({ceiling.replace('_', ' ')})."
                )
                payload = self._payload(
                    code="TOO_MANY_CONNECTIONS",
                    category=Category.CONNECTION,
                    message=message,
                    retry_after=limits.retry_after,
                    policy=f"connections/{ceiling}",
                )
                return _finish(
                    Decision(Outcome.REJECT, f"connections/{ceiling}", payload), shadowed, trace
                )
        return _finish(ALLOW, shadowed, trace)

    async def _count_connection(self, sid: str, limits: ConnectionLimits) -> str | None:
        """Count a new connection unless a ceiling is reached; the ceiling hit, if any.

        Where it was counted is remembered, so that its disconnect releases exactly that
        count: nothing when it was let in uncounted, the local count when the shared store
        did not answer under ``on_store_error: local``.
        """
        store: StateStore = self.store
        try:
            if store is self.local:
                ceiling = await store.open_connection(limits)
            else:
                ceiling = await self._with_timeout(store.open_connection(limits))
        except StoreError:
            mode = self.policy.defaults.on_store_error
            if mode is StoreFailureMode.FAIL_CLOSED:
                return _STORE_UNAVAILABLE
            if mode is StoreFailureMode.FAIL_OPEN:
                return None  # let in, and counted nowhere
            store = self.local
            ceiling = await store.open_connection(limits)
        if ceiling is None:
            self._counted_in[sid] = store
        return ceiling

    async def on_disconnect(self, conn: Mapping[str, Any]) -> None:
        self._connection_keys.pop(conn["sid"], None)
        store = self._counted_in.pop(conn["sid"], None)
        if store is self.local:
            await self.local.close_connection(conn["user_id"], conn["ip"])
        elif store is not None:
            await self._guarded(store.close_connection(conn["user_id"], conn["ip"]), None)

    async def record_auth_failure(self, conn: Mapping[str, Any]) -> int:
        """Count a failed authentication against the client's IP and user."""
        spec = self.policy.connections.auth_failures
        if spec is None:
            return 0
        now = self.clock()
        counts = [
            await self._guarded(self.store.record_auth_failure(key, spec.window, now), 0)
            for key in _auth_keys(conn)
        ]
        return max(counts, default=0)

    async def clear_auth_failures(self, conn: Mapping[str, Any]) -> None:
        if self.policy.connections.auth_failures is None:
            return
        for key in _auth_keys(conn):
            await self._guarded(self.store.clear_auth_failures(key), None)

    def counts_as_auth_failure(self, classification: Classification) -> bool:
        spec = self.policy.connections.auth_failures
        return spec is not None and classification.code in spec.codes

    # -- events ------------------------------------------------------------------------------

    async def on_event(
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        *,
        explain: bool = False,
    ) -> Decision:
        """Judge one incoming event before its handler runs."""
        trace: list[TraceEntry] | None = [] if explain else None
        shadowed: list[str] = []
        plan = self.policy.event_plans[event["name"]]
        refusal, activation = self._judge_event(plan, conn, claims, event, trace, shadowed)
        if activation is not None and (refusal is None or refusal.outcome is Outcome.DELAY):
            # An explanation lists every limit at the hook, a decision only those that apply.
            rules = (
                plan.rate_limits if trace is None else self.policy.by_hook.rate_limits[Hook.EVENT]
            )
            if rules:
                refusal = await self._rate_limits(rules, activation, trace, shadowed) or refusal
        return _finish(refusal or ALLOW, shadowed, trace)

    def judge_event_now(
        self, conn: Mapping[str, Any], claims: Mapping[str, Any], event: dict[str, Any]
    ) -> EventVerdict | None:
        """:meth:`on_event` and :meth:`before_call` in one call, when neither has to wait.

        Most events meet no rate limit and, on the memory store, nothing else awaits: their
        whole verdict costs one plain call instead of two coroutines. None means "await the
        two methods instead" (a rate limit applies, or a breaker's state is in a shared
        store). The guard is None when the decision is a delay: breaker permits are asked for
        after it, so a delayed call does not hold one while it waits.
        """
        plan = self.policy.event_plans[event["name"]]
        if plan.rate_limits or (plan.breakers and self.store is not self.local):
            return None
        if plan.plain:
            # The common case, answered without building a context: only the size and the
            # shedding rules armed under the current load sample can refuse this event.
            max_bytes = plan.spec.max_bytes
            if (max_bytes is None or event["size_bytes"] <= max_bytes) and (
                not plan.shedding or self._armed_shedding().isdisjoint(plan.shedding_names)
            ):
                event["priority"] = plan.priority
                return _ALLOWED
        shadowed: list[str] = []
        refusal, activation = self._judge_event(plan, conn, claims, event, None, shadowed)
        decision = _finish(refusal or ALLOW, shadowed, None)
        if decision.outcome is Outcome.DELAY:
            return EventVerdict(decision, None)
        if activation is None or refusal is not None or not plan.breakers:
            return EventVerdict(decision, NO_GUARD)
        permits = self._acquire_now(plan.breakers, conn, claims, event, activation)
        if isinstance(permits, BreakerGuard):
            return EventVerdict(decision, permits)
        return EventVerdict(permits, NO_GUARD)

    def _judge_event(  # noqa: PLR0917 (every caller passes all six)
        self,
        plan: EventPlan,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        trace: list[TraceEntry] | None,
        shadowed: list[str],
    ) -> tuple[Decision | None, dict[str, Any] | None]:
        """Payload, shedding and authorization: the checks that need no store.

        Returns the refusal, if any, and the activation the later checks evaluate against
        (None when the payload was refused before one was built).
        """
        spec = plan.spec
        event["priority"] = plan.priority
        refusal = self._check_payload(spec.name, spec.max_bytes, spec.validate, event, trace)
        if refusal is not None:
            return refusal, None
        activation = {"conn": conn, "claims": claims, "event": event, "load": self.load}
        if trace is None:
            shedding, authorization = plan.shedding, plan.authorization
        else:
            # An explanation shows every rule at the hook, including those that cannot apply.
            index = self.policy.by_hook
            shedding, authorization = index.shedding[Hook.EVENT], index.authorization[Hook.EVENT]
        refusal = self._shed(shedding, activation, spec.priority, trace, shadowed)
        if refusal is None or refusal.outcome is Outcome.DELAY:
            # A delay only postpones the event: what would refuse it still does.
            refusal = (
                self._authorize(authorization, Hook.EVENT, activation, trace, shadowed) or refusal
            )
        return refusal, activation

    async def on_emit(
        self, conn: Mapping[str, Any], claims: Mapping[str, Any], event: dict[str, Any]
    ) -> Decision:
        """Judge one outgoing event: shedding and emit-hook rate limits."""
        policy = self.policy
        spec = policy.events.get(event["name"]) or policy.default_event
        event["priority"] = spec.priority.value
        if not policy.by_hook.limits_or_sheds(Hook.EMIT):
            return ALLOW
        shadowed: list[str] = []
        activation = {"conn": conn, "claims": claims, "event": event, "load": self.load}
        sheds = policy.by_hook.shedding[Hook.EMIT]
        refusal = self._shed(sheds, activation, spec.priority, None, shadowed)
        if refusal is None or refusal.outcome is Outcome.DELAY:
            limits = policy.by_hook.rate_limits_for(Hook.EMIT, event["name"])
            refusal = await self._rate_limits(limits, activation, None, shadowed) or refusal
        return _finish(refusal or ALLOW, shadowed, None)

    # -- circuit breakers --------------------------------------------------------------------

    async def before_call(
        self, conn: Mapping[str, Any], claims: Mapping[str, Any], event: Mapping[str, Any]
    ) -> BreakerGuard | Decision:
        """Ask every breaker guarding this event for a permit; refuse at once if one is open."""
        breakers = self.policy.event_plans[event["name"]].breakers
        if not breakers:
            return NO_GUARD
        if self.store is self.local:
            return self._acquire_now(breakers, conn, claims, event)
        activation: dict[str, Any] | None = None
        now = self.clock()
        taken: list[CircuitBreakerSpec] = []
        transitions: list[tuple[str, Transition]] = []
        for spec in breakers:
            if not spec.match.is_name_test:
                # Only a condition beyond the event name needs the whole context.
                activation = activation or self._activation(conn, claims, event)
                if not matches(spec.match, activation, self.policy.defaults.on_eval_error):
                    continue
            permit: Permit | None
            try:
                permit = await self._with_timeout(self.store.breaker_acquire(spec, now))
            except StoreError:
                # fail_open and local: the call goes ahead, this breaker cannot guard it.
                permit = None
                if self.policy.defaults.on_store_error is StoreFailureMode.FAIL_CLOSED:
                    permit = Permit(False, _STORE_RETRY_AFTER, Circuit.OPEN)
            if self._granted(spec, permit, taken, transitions):
                continue
            for held in taken:
                await self._guarded(self.store.breaker_release(held), None)
            return self._breaker_refusal(spec, permit)
        return BreakerGuard(tuple(taken), now, tuple(transitions)) if taken else NO_GUARD

    def _acquire_now(
        self,
        breakers: tuple[CircuitBreakerSpec, ...],
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: Mapping[str, Any],
        activation: Mapping[str, Any] | None = None,
    ) -> BreakerGuard | Decision:
        """:meth:`before_call` on the memory store, whose breaker state needs no await."""
        local = self.local
        now = self.clock()
        taken: list[CircuitBreakerSpec] = []
        transitions: list[tuple[str, Transition]] = []
        for spec in breakers:
            if not spec.match.is_name_test:
                activation = activation or self._activation(conn, claims, event)
                if not matches(spec.match, activation, self.policy.defaults.on_eval_error):
                    continue
            permit = local.breaker_acquire_now(spec, now)
            if permit.permitted:  # the common case, without a call
                taken.append(spec)
                if permit.transition is not None:
                    transitions.append((spec.name, permit.transition))
                continue
            if self._granted(spec, permit, taken, transitions):
                continue
            for held in taken:
                local.breaker_release_now(held)
            return self._breaker_refusal(spec, permit)
        return BreakerGuard(tuple(taken), now, tuple(transitions)) if taken else NO_GUARD

    def _activation(
        self, conn: Mapping[str, Any], claims: Mapping[str, Any], event: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {"conn": conn, "claims": claims, "event": event, "load": self.load}

    @staticmethod
    def _granted(
        spec: CircuitBreakerSpec,
        permit: Permit | None,
        taken: list[CircuitBreakerSpec],
        transitions: list[tuple[str, Transition]],
    ) -> bool:
        """Whether the call may go on past this breaker; notes the permit it holds."""
        if permit is not None and permit.permitted:
            taken.append(spec)
            if permit.transition is not None:
                transitions.append((spec.name, permit.transition))
            return True
        # No answer from the store (its failure mode let the call through), or shadow mode.
        return permit is None or spec.mode is Mode.SHADOW

    def _breaker_refusal(self, spec: CircuitBreakerSpec, permit: Permit | None) -> Decision:
        payload = self._payload(
            code=spec.code,
            category=Category.SYSTEM,
            message=spec.message,
            retry_after=permit.retry_after if permit is not None else None,
            policy=f"circuit_breakers/{spec.name}",
            retryable=True,
        )
        if spec.fallback is not None:
            payload = {**payload, "fallback": dict(spec.fallback)}
        return Decision(Outcome.REJECT, f"circuit_breakers/{spec.name}", payload)

    async def after_call(
        self,
        guard: BreakerGuard,
        conn: Mapping[str, Any],
        event: Mapping[str, Any],
        classification: Classification | None,
        error: Mapping[str, Any] | None,
    ) -> list[tuple[str, Any]]:
        """Report the handler's outcome to the breakers it held; returns their transitions."""
        if not guard.permits:
            return []
        now = self.clock()
        duration = now - guard.started
        # As in Resilience4j, record_when judges exceptions only: a return is a success,
        # and slow calls are counted through the breaker's slow_call settings.
        failed = classification is not None
        activation: dict[str, Any] | None = None
        if classification is not None and any(s.record_when for s in guard.permits):
            call = {"duration_ms": int(duration * 1000), "failed": True, "event": event["name"]}
            error_var = classification.as_context(error or {})
            activation = {"conn": conn, "event": event, "error": error_var, "call": call}
        transitions: list[tuple[str, Any]] = []
        on_eval_error = self.policy.defaults.on_eval_error
        for spec in guard.permits:
            recorded = failed
            if activation is not None and spec.record_when is not None:
                recorded = matches(spec.record_when, activation, on_eval_error)
            if self.store is self.local:
                transition = self.local.breaker_record_now(
                    spec, now, failed=recorded, duration=duration
                )
            else:
                transition = await self._guarded(
                    self.store.breaker_record(spec, now, failed=recorded, duration=duration), None
                )
            if transition is not None:
                transitions.append((spec.name, transition))
        return transitions

    # -- errors ------------------------------------------------------------------------------

    def on_error(
        self,
        exc: BaseException,
        hook: Hook,
        conn: Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
    ) -> tuple[Classification, dict[str, Any], dict[str, Any]]:
        """Classify an exception: the classification, its client payload, the error context."""
        error = error_context(exc, hook.value)
        activation = {
            "conn": conn if conn is not None else CONN.defaults(),
            "claims": claims if claims is not None else {},
            "event": event if event is not None else EVENT.defaults(),
            "error": error,
            "hook": hook.value,
        }
        classification = classify(self.policy, activation)
        return classification, classification.payload(new_correlation_id()), error

    # -- load shedding of connections --------------------------------------------------------

    def connections_to_shed(
        self, connections: Iterable[Mapping[str, Any]]
    ) -> list[tuple[str, dict[str, Any]]]:
        """On a sampler tick: the connections to disconnect now, lowest priority first."""
        activation = {"load": self.load}
        chosen: list[tuple[str, dict[str, Any]]] = []
        for rule in self.policy.shedding:
            if rule.action is not ShedAction.DISCONNECT or rule.mode is Mode.SHADOW:
                if rule.action is ShedAction.DISCONNECT:
                    self._sustained(rule, activation)
                continue
            if not self._sustained(rule, activation):
                continue
            ceiling = rule.max_priority.rank
            candidates = sorted(
                (c for c in connections if c["priority"] <= ceiling),
                key=lambda c: (c["priority"], -c["connected_ms"]),
            )
            for conn in candidates[: rule.max_disconnects]:
                chosen.append((conn["sid"], self._shed_payload(rule)))
            break
        return chosen

    # -- rule groups -------------------------------------------------------------------------

    def _check_payload(
        self,
        name: str,
        max_bytes: int | None,
        validate: Callable[[Any], Any] | None,
        event: Mapping[str, Any],
        trace: list[TraceEntry] | None,
    ) -> Decision | None:
        if max_bytes is not None and event["size_bytes"] > max_bytes:
            if trace is not None:
                trace.append(
                    TraceEntry(
                        "events",
                        name,
                        True,
                        "reject",
                        {"size_bytes": event["size_bytes"], "max_bytes": max_bytes},
                    )
                )
            payload = self._payload(
                code="PAYLOAD_TOO_LARGE",
                category=Category.CLIENT,
                message=f"The event is larger than {max_bytes} bytes.",
                retry_after=None,
                policy=f"events/{name}",
            )
            return Decision(Outcome.REJECT, f"events/{name}", payload)
        if validate is not None:
            try:
                validate(event["payload"])
            except fastjsonschema.JsonSchemaValueException as exc:
                if trace is not None:
                    trace.append(
                        TraceEntry("events", name, True, "reject", {"schema": exc.message})
                    )
                payload = self._payload(
                    code="INVALID_PAYLOAD",
                    category=Category.CLIENT,
                    message=f"Invalid payload: {exc.message}"[:300],
                    retry_after=None,
                    policy=f"events/{name}",
                )
                return Decision(Outcome.REJECT, f"events/{name}", payload)
        if trace is not None:
            trace.append(
                TraceEntry("events", name, False, "allow", {"size_bytes": event["size_bytes"]})
            )
        return None

    def _shed(
        self,
        rules: tuple[SheddingRuleSpec, ...],
        activation: Mapping[str, Any],
        priority: Priority | None,
        trace: list[TraceEntry] | None,
        shadowed: list[str],
    ) -> Decision | None:
        if not rules:
            return None
        failure = self.policy.defaults.on_eval_error
        armed = self._armed_shedding()
        for rule in rules:
            if priority is not None and priority.rank > rule.max_priority.rank:
                if trace is not None:
                    trace.append(
                        TraceEntry(
                            "shedding", rule.name, False, "skip", {"priority": priority.value}
                        )
                    )
                continue
            if trace is None and rule.name not in armed:
                continue  # its load condition is false under this sample
            hit = self._sustained(rule, activation, failure)
            if trace is not None:
                trace.append(
                    TraceEntry(
                        "shedding",
                        rule.name,
                        hit,
                        rule.action.value if hit else "allow",
                        {"load": dict(self.load)},
                    )
                )
            if not hit:
                continue
            if rule.mode is Mode.SHADOW:
                shadowed.append(f"shedding/{rule.name}")
                continue
            outcome = {
                ShedAction.REJECT: Outcome.REJECT,
                ShedAction.DROP: Outcome.DROP,
                ShedAction.DELAY: Outcome.DELAY,
            }[rule.action]
            if outcome is Outcome.DELAY:
                return Decision(Outcome.DELAY, f"shedding/{rule.name}", None, rule.delay)
            return Decision(outcome, f"shedding/{rule.name}", self._shed_payload(rule))
        return None

    def _shed_payload(self, rule: SheddingRuleSpec) -> dict[str, Any]:
        return self._payload(
            code=rule.code,
            category=Category.SYSTEM,
            message=rule.message,
            retry_after=rule.retry_after,
            policy=f"shedding/{rule.name}",
            retryable=True,
        )

    def _armed_shedding(self) -> frozenset[str]:
        """The shedding rules whose ``load`` operands hold under the current load sample.

        The others cannot apply to any event until the next sample, so they are not
        evaluated per event; as their condition is false, their ``sustained_for`` clocks
        restart. A gate that fails to evaluate arms its rule, which then meets the policy's
        ``on_eval_error`` per event as before.
        """
        policy, load = self.policy, self.load
        armed_for = self._armed_for
        if armed_for is not None and armed_for[0] is policy and armed_for[1] is load:
            return self._armed
        armed: set[str] = set()
        variables = {"load": load}
        for rule in policy.shedding:
            gate = rule.load_gate
            try:
                holds = gate is None or gate.evaluate(variables) is True
            except EvaluationError:
                holds = True
            if holds:
                armed.add(rule.name)
            else:
                self._condition_since.pop(rule.name, None)
        self._armed_for, self._armed = (policy, load), frozenset(armed)
        return self._armed

    def _sustained(
        self,
        rule: SheddingRuleSpec,
        activation: Mapping[str, Any],
        failure: EvalFailureMode = EvalFailureMode.FAIL_OPEN,
    ) -> bool:
        """Whether the rule's condition holds, and has held for ``sustained_for``."""
        if not matches(rule.when, activation, failure):
            self._condition_since.pop(rule.name, None)
            return False
        if rule.sustained_for <= 0:
            return True
        now = self.clock()
        since = self._condition_since.setdefault(rule.name, now)
        return now - since >= rule.sustained_for

    def _authorize(
        self,
        rules: tuple[AuthzRuleSpec, ...],
        hook: Hook,
        activation: Mapping[str, Any],
        trace: list[TraceEntry] | None,
        shadowed: list[str],
    ) -> Decision | None:
        policy = self.policy
        authorization = policy.authorization
        failure = policy.defaults.on_eval_error
        for rule in rules:
            hit = matches(rule.when, activation, failure)
            if trace is not None:
                trace.append(
                    TraceEntry(
                        "authorization", rule.name, hit, rule.effect.value if hit else "skip"
                    )
                )
            if not hit:
                continue
            if rule.effect is Effect.ALLOW:
                return None
            if rule.mode is Mode.SHADOW:
                shadowed.append(f"authorization/{rule.name}")
                continue
            return self._forbidden(rule.name, rule.code, rule.message, hook)
        if authorization.default is Effect.DENY:
            return self._forbidden("default", "FORBIDDEN", "Not allowed.", hook)
        return None

    def _forbidden(self, name: str, code: str, message: str, hook: Hook) -> Decision:
        category = Category.CONNECTION if hook is Hook.CONNECT else Category.CLIENT
        payload = self._payload(
            code=code,
            category=category,
            message=message,
            retry_after=None,
            policy=f"authorization/{name}",
        )
        return Decision(Outcome.REJECT, f"authorization/{name}", payload)

    async def _rate_limits(
        self,
        rules: tuple[RateLimitSpec, ...],
        activation: Mapping[str, Any],
        trace: list[TraceEntry] | None,
        shadowed: list[str],
    ) -> Decision | None:
        if not rules:
            return None
        failure = self.policy.defaults.on_eval_error
        enforced_local: list[tuple[RateLimitSpec, str]] = []
        enforced_shared: list[tuple[RateLimitSpec, str]] = []
        shadow: list[tuple[RateLimitSpec, str]] = []
        for rule in rules:
            if rule.when is not None and not matches(rule.when, activation, failure):
                if trace is not None:
                    trace.append(TraceEntry("rate_limits", rule.name, False, "skip"))
                continue
            try:
                key = self._key(rule.key, activation)
            except EvaluationError as exc:
                if trace is not None:
                    trace.append(
                        TraceEntry(
                            "rate_limits", rule.name, False, "key-error", {"error": str(exc)}
                        )
                    )
                if failure is EvalFailureMode.FAIL_CLOSED:
                    return self._rate_refusal(rule, None)
                continue
            if rule.mode is Mode.SHADOW:
                shadow.append((rule, key))
            elif rule.scope is Scope.LOCAL or self.store is self.local:
                enforced_local.append((rule, key))
            else:
                enforced_shared.append((rule, key))
        now = self.clock()
        local = self.local
        for rule, key in shadow:
            result: CombinedDecision | RateDecision
            if rule.scope is Scope.LOCAL or self.store is local:
                result = local.check_rate_limit_now(rule, key, now)
            else:
                result = await self._check_rates([(rule, key)], now, shared=True)
            if trace is not None:
                trace.append(
                    TraceEntry(
                        "rate_limits",
                        rule.name,
                        True,
                        "shadow-" + ("allow" if result.allowed else "reject"),
                        {"key": key, "retry_after": result.retry_after},
                    )
                )
            if not result.allowed:
                shadowed.append(f"rate_limits/{rule.name}")
        if not enforced_shared:
            if not enforced_local:
                return None
            if trace is None and len(enforced_local) == 1:
                return self._enforce_alone(*enforced_local[0], now)
        decided: CombinedDecision | None = (
            self.local.check_rate_limits_now(enforced_local, now) if enforced_local else None
        )
        if enforced_shared and (decided is None or decided.allowed):
            shared = await self._check_rates(enforced_shared, now, shared=True)
            if decided is None or not shared.allowed:
                decided = shared
        if decided is None:
            return None
        if trace is not None:
            for rule, key in (*enforced_local, *enforced_shared):
                deciding = decided.rule == rule.name
                trace.append(
                    TraceEntry(
                        "rate_limits",
                        rule.name,
                        True,
                        "reject" if deciding and not decided.allowed else "allow",
                        {"key": key, "retry_after": decided.retry_after if deciding else 0.0},
                    )
                )
        if decided.allowed:
            return None
        decided_rule, decided_key = next(
            (r, k) for r, k in (*enforced_local, *enforced_shared) if r.name == decided.rule
        )
        return self._rate_refusal(decided_rule, decided, decided_key)

    def _enforce_alone(self, rule: RateLimitSpec, key: str, now: float) -> Decision | None:
        """One local limit alone, untraced: its own decision is the combined one."""
        single = self.local.check_rate_limit_now(rule, key, now)
        if single.allowed:
            return None
        return self._rate_refusal(
            rule, CombinedDecision(False, single.retry_after, rule.name, single), key
        )

    def _key(self, expression: Expression, activation: Mapping[str, Any]) -> str:
        if not expression.per_connection or expression.path is not None:
            return str(evaluate_value(expression, activation))
        sid = activation["conn"]["sid"]
        keys = self._connection_keys.get(sid)
        if keys is None:
            keys = self._connection_keys[sid] = {}
        # Keyed as Expression compares (source and context), without its Python-level hash.
        identity = (expression.source, expression.context)
        key = keys.get(identity)
        if key is None:
            key = keys[identity] = str(evaluate_value(expression, activation))
        return key

    async def _check_rates(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float, *, shared: bool
    ) -> CombinedDecision:
        if not shared or self.store is self.local:
            return self.local.check_rate_limits_now(checks, now)
        mode = self.policy.defaults.on_store_error
        try:
            return await self._with_timeout(self.store.check_rate_limits(checks, now))
        except StoreError:
            if mode is StoreFailureMode.LOCAL:
                return self.local.check_rate_limits_now(checks, now)
            allowed = mode is StoreFailureMode.FAIL_OPEN
            rule = checks[0][0].name if checks else None
            return CombinedDecision(allowed, 0.0 if allowed else _STORE_RETRY_AFTER, rule, None)

    def _rate_refusal(
        self, rule: RateLimitSpec, combined: CombinedDecision | None, key: str | None = None
    ) -> Decision:
        payload = self._payload(
            code=rule.code,
            category=Category.CLIENT,
            message=rule.message,
            retry_after=combined.retry_after if combined else rule.rate.interval,
            policy=f"rate_limits/{rule.name}",
            retryable=True,
        )
        return Decision(
            Outcome.REJECT,
            f"rate_limits/{rule.name}",
            payload,
            key=key if rule.key_label else None,
        )

    async def _auth_throttle(
        self, conn: Mapping[str, Any], trace: list[TraceEntry] | None
    ) -> Decision | None:
        """Progressive delays: after ``threshold`` failures, each retry must wait longer."""
        spec = self.policy.connections.auth_failures
        if spec is None:
            return None
        now = self.clock()
        worst_count, last = 0, 0.0
        for key in _auth_keys(conn):
            count, at = await self._guarded(
                self.store.auth_failures(key, spec.window, now), (0, 0.0)
            )
            if count > worst_count:
                worst_count, last = count, at
        if trace is not None:
            trace.append(
                TraceEntry(
                    "connections",
                    "auth_failures",
                    worst_count >= spec.threshold,
                    "check",
                    {"failures": worst_count},
                )
            )
        if spec.block_after and worst_count >= spec.block_after:
            payload = self._payload(
                code="AUTH_BLOCKED",
                category=Category.CONNECTION,
                message="Too many failed sign-in attempts; try again later.",
                retry_after=max(0.0, last + spec.window - now),
                policy="connections/auth_failures",
                retryable=True,
                backoff_name=spec.backoff,
            )
            return Decision(Outcome.REJECT, "connections/auth_failures", payload)
        if worst_count < spec.threshold:
            return None
        policy_backoff = self.policy.backoff[spec.backoff]
        attempt = worst_count - spec.threshold + 1
        delay = _deterministic_delay(policy_backoff, attempt)
        wait = last + delay - now
        if wait <= 0:
            return None
        payload = self._payload(
            code="AUTH_THROTTLED",
            category=Category.CONNECTION,
            message="Too many failed sign-in attempts; wait before retrying.",
            retry_after=wait,
            policy="connections/auth_failures",
            retryable=True,
            backoff_name=spec.backoff,
        )
        return Decision(Outcome.REJECT, "connections/auth_failures", payload)

    def _priority(self, activation: Mapping[str, Any]) -> int:
        expression = self.policy.connections.priority
        if expression is None:
            return 0
        try:
            value = evaluate_value(expression, activation)
        except EvaluationError:
            return 0
        return value if isinstance(value, int) else 0

    # -- plumbing ----------------------------------------------------------------------------

    def _payload(
        self,
        *,
        code: str,
        category: Category,
        message: str,
        retry_after: float | None,
        policy: str,
        retryable: bool = False,
        backoff_name: str | None = None,
    ) -> dict[str, Any]:
        name = backoff_name or self.policy.defaults.backoff
        return client_payload(
            code=code,
            category=category,
            message=message,
            retryable=retryable,
            retry_after=retry_after,
            backoff=self.policy.backoff.get(name) if retryable else None,
            policy=policy,
            correlation_id=new_correlation_id(),
        )

    async def _with_timeout(self, awaitable: Awaitable[T]) -> T:
        """A shared-store call within ``store_timeout``; StoreError when it fails."""
        try:
            answer = await asyncio.wait_for(awaitable, self.policy.defaults.store_timeout)
        except StoreError as exc:
            self.store_health.failed(exc)
            raise
        except (TimeoutError, OSError, ConnectionError) as exc:
            self.store_health.failed(exc)
            raise StoreError(f"state store did not answer: {exc!r}") from exc
        self.store_health.answered()
        return answer

    async def _guarded(self, awaitable: Awaitable[T], fallback: T) -> T:
        """Run a store call; on failure fall back per policy (memory never fails)."""
        if self.store is self.local:
            return await awaitable
        try:
            return await self._with_timeout(awaitable)
        except StoreError:
            return fallback


def _auth_keys(conn: Mapping[str, Any]) -> list[str]:
    keys = [f"ip:{conn['ip']}"]
    if conn["user_id"]:
        keys.append(f"user:{conn['user_id']}")
    return keys


def _deterministic_delay(spec: BackoffSpec, attempt: int) -> float:
    """The un-jittered delay of a backoff policy: a server-side wait must be predictable."""
    return min(spec.max, spec.base * spec.multiplier ** max(0, attempt - 1))


def _finish(decision: Decision, shadowed: list[str], trace: list[TraceEntry] | None) -> Decision:
    if not shadowed and trace is None:
        return decision
    # Built field by field: NamedTuple._replace costs several times more.
    return Decision(
        decision.outcome,
        decision.rule,
        decision.payload,
        decision.delay,
        tuple(shadowed),
        tuple(trace) if trace is not None else (),
        decision.key,
    )
