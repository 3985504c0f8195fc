from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from servers import CONTRACT_KEYS

from policy_engine.algorithms.ratelimit import CombinedDecision
from policy_engine.compiler.pipeline import compile_file, compile_text
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import (
    NO_GUARD,
    BreakerGuard,
    Engine,
    EventVerdict,
    PendingEvent,
    conn_context,
    event_context,
)
from policy_engine.errors import StoreError
from policy_engine.language.contexts import Hook
from policy_engine.language.model import PolicySet, RateLimitSpec
from policy_engine.state.memory import MemoryStore

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(text: str) -> PolicySet:
    return compile_text("version: 1\n" + text).policy


def engine_for(text: str, store: Any = None) -> tuple[Engine, Clock]:
    clock = Clock()
    return Engine(policy(text), store, clock=clock), clock


def conn(**fields: Any) -> dict[str, Any]:
    fields.setdefault("sid", "s1")
    fields.setdefault("ip", "192.0.2.1")
    fields.setdefault("conversation_id", "c1")
    return conn_context(**fields)


async def test_every_refusal_carries_the_full_client_payload() -> None:
    engine = Engine(compile_file(SHIPPED).policy)
    decision = await engine.on_connect(conn(conversation_id=""), {})
    assert decision.outcome is Outcome.REJECT
    assert decision.payload is not None
    assert set(decision.payload) == CONTRACT_KEYS
    assert decision.payload["policy"] == "authorization/require-conversation"
    assert len(decision.payload["correlation_id"]) == 16


SHADOW_AND_ENFORCED = """
rate_limits:
  - {name: strict, hook: event, key: conn.sid, limit: 2/minute, mode: shadow}
  - {name: loose, hook: event, key: conn.sid, limit: 5/minute}
"""


async def test_shadow_rules_name_what_they_would_refuse_but_refuse_nothing() -> None:
    engine, _ = engine_for(SHADOW_AND_ENFORCED)
    outcomes = [await engine.on_event(conn(), {}, event_context("x")) for _ in range(5)]
    assert [d.outcome for d in outcomes] == [Outcome.ALLOW] * 5
    assert [d.shadowed for d in outcomes] == [(), (), *[("rate_limits/strict",)] * 3]
    sixth = await engine.on_event(conn(), {}, event_context("x"))
    assert sixth.rule == "rate_limits/loose"


TWO_LIMITS = """
rate_limits:
  - {name: per-conn, hook: event, key: conn.sid, limit: 3/minute}
  - {name: per-conversation, hook: event, key: conn.conversation_id, limit: 4/minute}
"""


async def test_a_refusal_by_one_limit_consumes_nothing_from_the_others() -> None:
    engine, _ = engine_for(TWO_LIMITS)
    first = [await engine.on_event(conn(sid="a"), {}, event_context("x")) for _ in range(5)]
    assert [d.outcome for d in first] == [Outcome.ALLOW] * 3 + [Outcome.REJECT] * 2
    assert first[-1].rule == "rate_limits/per-conn"
    # the two refused events did not use the conversation's budget: one is left
    other = [await engine.on_event(conn(sid="b"), {}, event_context("x")) for _ in range(2)]
    assert [d.outcome for d in other] == [Outcome.ALLOW, Outcome.REJECT]
    assert other[-1].rule == "rate_limits/per-conversation"


async def test_the_most_restrictive_retry_after_is_reported() -> None:
    engine, _ = engine_for(
        """
rate_limits:
  - {name: fast, hook: event, key: conn.sid, limit: 1/second, burst: 1}
  - {name: slow, hook: event, key: conn.sid, limit: 1/minute, burst: 1}
"""
    )
    await engine.on_event(conn(), {}, event_context("x"))
    refused = await engine.on_event(conn(), {}, event_context("x"))
    assert refused.rule == "rate_limits/slow"
    assert refused.payload is not None
    assert refused.payload["retry_after_ms"] == 60_000


async def test_a_reload_keeps_the_state_of_rules_that_kept_their_name() -> None:
    engine, _ = engine_for(TWO_LIMITS)
    for _ in range(3):
        await engine.on_event(conn(), {}, event_context("x"))
    engine.swap(policy(TWO_LIMITS.replace("per-conversation, hook: event", "renamed, hook: event")))
    refused = await engine.on_event(conn(), {}, event_context("x"))
    assert refused.rule == "rate_limits/per-conn"


async def test_a_key_spraying_client_cannot_grow_memory_past_max_keys() -> None:
    engine, _ = engine_for(
        "rate_limits:\n  - {name: by-ip, hook: connect, key: conn.ip, limit: 5/minute, "
        "max_keys: 100}\n"
    )
    for index in range(1_000):
        await engine.on_connect(conn(ip=f"10.0.{index // 256}.{index % 256}"), {})
    assert engine.local.rate_keys("by-ip") == 100


async def test_expired_states_count_as_empty() -> None:
    engine, clock = engine_for(
        "rate_limits:\n  - {name: l, hook: event, key: conn.sid, limit: 1/second, burst: 1}\n"
    )
    assert (await engine.on_event(conn(), {}, event_context("x"))).allowed
    assert not (await engine.on_event(conn(), {}, event_context("x"))).allowed
    clock.now += 1.0
    assert (await engine.on_event(conn(), {}, event_context("x"))).allowed


class DownStore:
    """A shared store that is down: every round trip fails, as Redis does in an outage."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreError("connection refused")

        return fail

    async def check_rate_limits(
        self, checks: Sequence[tuple[RateLimitSpec, str]], now: float
    ) -> CombinedDecision:
        raise StoreError("connection refused")


@pytest.mark.parametrize(
    ("mode", "allowed_count"), [("fail_open", 5), ("fail_closed", 0), ("local", 2)]
)
async def test_a_failing_store_follows_the_declared_failure_mode(
    mode: str, allowed_count: int
) -> None:
    engine, _ = engine_for(
        f"defaults: {{on_store_error: {mode}}}\n"
        "rate_limits:\n  - {name: l, hook: event, key: conn.sid, limit: 2/minute}\n",
        DownStore(),
    )
    decisions = [await engine.on_event(conn(), {}, event_context("x")) for _ in range(5)]
    assert sum(d.allowed for d in decisions) == allowed_count


@pytest.mark.parametrize(("mode", "outcome"), [("fail_open", "allow"), ("fail_closed", "reject")])
async def test_a_failing_expression_follows_on_eval_error(mode: str, outcome: str) -> None:
    engine, _ = engine_for(
        f"defaults: {{on_eval_error: {mode}}}\n"
        "authorization:\n  rules:\n"
        "    - {name: admins-only, hook: event, when: 'claims.role != \"admin\"', effect: deny}\n"
    )
    # claims has no "role": the expression fails at run time instead of being false
    decision = await engine.on_event(conn(), {}, event_context("x"))
    assert decision.outcome.value == outcome


async def test_connection_limits_are_released_on_disconnect() -> None:
    engine, _ = engine_for("connections: {max_total: 2, max_per_user: 1}\n")
    alice = conn(sid="a", user_id="alice")
    assert (await engine.on_connect(alice, {})).allowed
    second = await engine.on_connect(conn(sid="b", user_id="alice"), {})
    assert second.rule == "connections/max_per_user"
    assert (await engine.on_connect(conn(sid="c", user_id="bob"), {})).allowed
    third = await engine.on_connect(conn(sid="d", user_id="carol"), {})
    assert third.rule == "connections/max_total"
    await engine.on_disconnect(alice)
    assert (await engine.on_connect(conn(sid="b", user_id="alice"), {})).allowed
    assert engine.local.connection_counts() == (2, 2, 1)


async def test_sustained_overload_sheds_the_lowest_priority_connections_first() -> None:
    engine, clock = engine_for(
        """
connections:
  priority: 'has(claims.plan) ? 2 : (conn.user_id == "" ? 0 : 1)'
shedding:
  - {name: shed, when: load.loop_lag_ms > 1000, action: disconnect, sustained_for: 10s,
     max_priority: normal, max_disconnects: 2}
"""
    )
    people = [
        (conn(sid="anon1"), {}),
        (conn(sid="user1", user_id="u1"), {}),
        (conn(sid="pro1", user_id="p1"), {"plan": "pro"}),
        (conn(sid="anon2"), {}),
    ]
    for person, claims in people:
        assert (await engine.on_connect(person, claims)).allowed
    connections = [person for person, _ in people]
    engine.load = {**engine.load, "loop_lag_ms": 1500}
    assert engine.connections_to_shed(connections) == []
    clock.now += 10
    chosen = engine.connections_to_shed(connections)
    assert sorted(sid for sid, _ in chosen) == ["anon1", "anon2"]
    assert all(payload["code"] == "OVERLOADED" for _, payload in chosen)
    engine.load = {**engine.load, "loop_lag_ms": 10}
    assert engine.connections_to_shed(connections) == []


async def test_classification_never_leaks_internals() -> None:
    engine = Engine(compile_file(SHIPPED).policy)
    secret = "password=hunter2 at /srv/app/secrets.py line 12"
    classification, payload, error = engine.on_error(
        RuntimeError(secret), Hook.EVENT, conn(), {}, None
    )
    assert classification.code == "INTERNAL"
    assert set(payload) == CONTRACT_KEYS
    assert secret not in str(payload)
    assert error["message"] == secret  # kept for the logs, not for the client


async def test_status_codes_on_exceptions_are_visible_to_rules() -> None:
    class HTTPError(Exception):
        status_code = 404

    engine = Engine(compile_file(SHIPPED).policy)
    classification, _, _ = engine.on_error(HTTPError(), Hook.CONNECT, conn(), {}, None)
    assert classification.code == "CONVERSATION_NOT_FOUND"


async def test_open_breaker_answers_with_its_fallback() -> None:
    engine, _ = engine_for(
        """
circuit_breakers:
  - {name: search, match: 'event.name == "search"', window: {calls: 4}, minimum_calls: 4,
     failure_rate: 50%, open_for: 10s, half_open_calls: 1, fallback: {results: []}}
"""
    )
    event = event_context("search")
    for failed in (True, True, False, False):
        guard = await engine.before_call(conn(), {}, event)
        assert not isinstance(guard, type(None))
        classification = engine.on_error(RuntimeError(), Hook.EVENT)[0] if failed else None
        await engine.after_call(guard, conn(), event, classification, {})  # type: ignore[arg-type]
    refused = await engine.before_call(conn(), {}, event)
    assert not hasattr(refused, "permits")
    # The fallback is the answer itself, not a refusal carrying it.
    assert refused.outcome is Outcome.DROP  # type: ignore[union-attr]
    assert refused.payload == {"results": []}  # type: ignore[union-attr]
    other = await engine.before_call(conn(), {}, event_context("chat"))
    assert hasattr(other, "permits")


async def test_an_application_refusal_no_rule_classifies_is_a_plain_refusal() -> None:
    class ConnectionRefusedError(Exception):  # the name is what classification sees
        pass

    engine, _ = engine_for("errors: []\n")
    classification, payload, _ = engine.on_error(ConnectionRefusedError("no"), Hook.CONNECT)
    assert (classification.code, classification.retryable) == ("CONNECTION_REFUSED", False)
    assert payload["category"] == "connection"
    other, _, _ = engine.on_error(ValueError("boom"), Hook.CONNECT)
    assert (other.code, other.retryable) == ("INTERNAL", True)


async def test_the_probe_permit_reports_the_move_to_half_open() -> None:
    engine, clock = engine_for(
        """
circuit_breakers:
  - {name: b, match: 'event.name == "x"', window: {calls: 2}, minimum_calls: 2,
     open_for: 5s, half_open_calls: 1}
"""
    )
    event = event_context("x")
    for _ in range(2):
        guard = await engine.before_call(conn(), {}, event)
        failure = engine.on_error(RuntimeError(), Hook.EVENT)[0]
        await engine.after_call(guard, conn(), event, failure, {})  # type: ignore[arg-type]
    clock.now += 5
    probe = await engine.before_call(conn(), {}, event)
    assert [(name, t.to_state.value) for name, t in probe.transitions] == [  # type: ignore[union-attr]
        ("b", "half_open")
    ]


# -- event plans, the one-call verdict and shedding's load gates ------------------------------
# The engine resolves per event name which rules can apply, judges events that need no store
# in one plain call, and evaluates the ``load`` part of shedding conditions once per load
# sample. Each shortcut must decide exactly what the full path decides.

PLANNED = """
events:
  chat: {priority: high}
  telemetry: {priority: low}
shedding:
  - {name: drop-low, hook: event, when: "load.loop_lag_ms > 500", action: drop, max_priority: low}
  - name: delay-chat
    hook: event
    when: 'event.name == "chat" && load.loop_lag_ms > 300'
    action: delay
    delay: 10ms
    max_priority: high
authorization:
  rules:
    - {name: chat-needs-user, hook: event, when: 'event.name == "chat" && conn.user_id == ""',
       effect: deny}
    - {name: everyone, hook: event, when: "conn.ip != ''", effect: allow}
rate_limits:
  - {name: chat-rate, hook: event, when: 'event.name == "chat"', key: conn.sid, limit: 5/second}
  - {name: all-rate, hook: event, key: conn.sid, limit: 100/second}
circuit_breakers:
  - {name: tools, match: 'event.name in ["tool", "chat"]', failure_rate: 50%,
     window: {calls: 10}, minimum_calls: 5, open_for: 10s}
"""


def names(rules: Any) -> list[str]:
    return [rule.name for rule in rules]


def test_a_plan_holds_only_the_rules_that_can_apply_to_its_event() -> None:
    plans = policy(PLANNED).event_plans
    chat, telemetry, other = plans["chat"], plans["telemetry"], plans["anything-else"]
    # Shedding: by event name, and by the event's priority against max_priority.
    assert names(chat.shedding) == ["delay-chat"]
    assert names(telemetry.shedding) == ["drop-low"]
    assert names(other.shedding) == []  # normal priority is above drop-low's max
    # Authorization keeps policy order, so the first match still wins.
    assert names(chat.authorization) == ["chat-needs-user", "everyone"]
    assert names(other.authorization) == ["everyone"]
    assert names(chat.rate_limits) == ["chat-rate", "all-rate"]
    assert names(other.rate_limits) == ["all-rate"]
    assert names(chat.breakers) == ["tools"]
    assert names(plans["tool"].breakers) == ["tools"]
    assert names(other.breakers) == []
    assert (chat.priority, telemetry.priority, other.priority) == ("high", "low", "normal")
    assert telemetry.shedding_names == frozenset({"drop-low"})
    # Only events with nothing but size and shedding to check take the plain path: here an
    # authorization rule applies to every event.
    assert not any(plan.plain for plan in (chat, telemetry, other))
    shipped = compile_file(SHIPPED).policy.event_plans
    assert shipped["echo"].plain
    assert shipped["telemetry"].plain
    assert not shipped["oh_user_action"].plain  # a schema, an authorization rule, a breaker
    deny_by_default = policy("authorization: {default: deny}\n").event_plans
    assert not deny_by_default["echo"].plain


async def full_verdict(
    engine: Engine, conn: dict[str, Any], claims: dict[str, Any], event: dict[str, Any]
) -> tuple[Decision, BreakerGuard]:
    decision = await engine.on_event(conn, claims, event)
    if decision.outcome not in (Outcome.ALLOW, Outcome.DELAY):
        return decision, NO_GUARD
    permits = await engine.before_call(conn, claims, event)
    if isinstance(permits, BreakerGuard):
        return decision, permits
    return permits, NO_GUARD


SHORTCUT_CASES = [
    ("echo", {}, {}, 0),
    ("echo", {"sub": "alice"}, {}, 350),  # the shipped delay for normal events
    ("telemetry", {}, {}, 600),  # dropped under overload
    ("telemetry", {}, {}, 100),
    ("oh_event", {"role": "viewer"}, {}, 0),
    ("echo", {}, {"x": "y" * 70_000}, 0),  # over the default 64 KB
]


@pytest.mark.parametrize(("name", "claims", "payload", "lag"), SHORTCUT_CASES)
async def test_the_one_call_verdict_is_what_the_full_path_decides(
    name: str, claims: dict[str, Any], payload: dict[str, Any], lag: int
) -> None:
    shipped = compile_file(SHIPPED).policy
    engines = [Engine(shipped, clock=Clock()), Engine(shipped, clock=Clock())]
    for engine in engines:
        engine.load = {**engine.load, "loop_lag_ms": lag}
    conn = conn_context(sid="s1", ip="192.0.2.1", user_id="alice", conversation_id="c1")
    size = 80_000 if payload else 40
    quick = engines[0].judge_event_now(
        conn, claims, event_context(name, payload, size_bytes=size, has_ack=True)
    )
    full, guard = await full_verdict(
        engines[1], conn, claims, event_context(name, payload, size_bytes=size, has_ack=True)
    )
    assert quick is not None
    assert (quick.decision.outcome, quick.decision.rule) == (full.outcome, full.rule)
    if full.outcome is Outcome.DELAY:
        assert quick.guard is None  # permits are asked for after the delay
    else:
        assert quick.guard == guard


class RemoteStore:
    """A shared store that answers: a memory store reached only through the protocol."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_rate_limits_are_judged_in_one_call_on_the_memory_store() -> None:
    engine = Engine(compile_file(SHIPPED).policy, clock=Clock())
    conn = conn_context(sid="s1", ip="192.0.2.1", user_id="alice", conversation_id="c1")
    event = event_context("oh_user_action", {"action": "run"}, size_bytes=40)
    verdict = engine.judge_event_now(conn, {}, event)
    assert isinstance(verdict, EventVerdict)
    assert verdict.decision.allowed
    assert engine.local.rate_keys("user-actions-per-connection") == 1


async def test_an_event_whose_limits_are_shared_waits_for_the_store_then_concludes() -> None:
    text = "rate_limits:\n  - {name: l, hook: event, key: conn.sid, limit: 1/second, burst: 1}\n"
    remote = RemoteStore()
    engine = Engine(policy(text), remote, clock=Clock())
    conn = conn_context(sid="s1", ip="192.0.2.1")
    decisions = []
    for _ in range(2):
        pending = engine.judge_event_now(conn, {}, event_context("x"))
        assert isinstance(pending, PendingEvent)
        decisions.append(await engine.settle_event(pending))
    assert [d.allowed for d in decisions] == [True, False]
    assert decisions[1].rule == "rate_limits/l"
    assert remote.inner.rate_keys("l") == 1
    assert engine.local.rate_keys("l") == 0


async def test_breaker_permits_taken_in_one_call_are_the_breakers_own() -> None:
    text = """
circuit_breakers:
  - {name: tools, match: 'event.name == "tool"', failure_rate: 50%, window: {calls: 4},
     minimum_calls: 2, open_for: 10s}
"""
    clock = Clock()
    engine = Engine(policy(text), clock=clock)
    conn = conn_context(sid="s1", ip="192.0.2.1")
    for _ in range(2):
        verdict = engine.judge_event_now(conn, {}, event_context("tool"))
        assert verdict is not None
        assert verdict.guard is not None
        assert names(verdict.guard.permits) == ["tools"]
        failure = engine.on_error(RuntimeError(), Hook.EVENT)[0]
        await engine.after_call(verdict.guard, conn, event_context("tool"), failure, {})
    refused = engine.judge_event_now(conn, {}, event_context("tool"))
    assert refused is not None
    assert refused.decision.outcome is Outcome.REJECT
    assert refused.decision.rule == "circuit_breakers/tools"
    assert refused.guard == NO_GUARD
    assert engine.judge_event_now(conn, {}, event_context("chat")) is not None  # not guarded


GATED = """
defaults: {on_eval_error: fail_closed}
shedding:
  - {name: gated, hook: event, when: 'load.loop_lag_ms > 300 && event.priority == "normal"',
     action: drop, max_priority: normal}
  - {name: load-only, hook: event, when: "load.loop_lag_ms > 900 || load.memory_mb > 100",
     action: drop, max_priority: normal}
  - {name: no-load, hook: event, when: 'event.name == "noisy"', action: drop, max_priority: normal}
"""


def test_the_load_gate_is_the_part_of_a_condition_that_reads_only_load() -> None:
    rules = {rule.name: rule for rule in policy(GATED).shedding}
    assert rules["gated"].load_gate is not None
    assert rules["gated"].load_gate.evaluate({"load": {"loop_lag_ms": 301}}) is True
    assert rules["gated"].load_gate.evaluate({"load": {"loop_lag_ms": 300}}) is False
    assert rules["load-only"].load_gate is not None  # the whole condition is its gate
    assert rules["load-only"].load_gate.evaluate({"load": {"loop_lag_ms": 0, "memory_mb": 200}})
    assert rules["no-load"].load_gate is None


async def test_shedding_follows_each_new_load_sample() -> None:
    engine = Engine(policy(GATED), clock=Clock())
    conn = conn_context(sid="s1", ip="192.0.2.1")
    outcomes = []
    for lag in (0, 500, 0, 950):
        engine.load = {**engine.load, "loop_lag_ms": lag}
        decision = await engine.on_event(conn, {}, event_context("echo"))
        outcomes.append((decision.outcome, decision.rule))
    assert outcomes == [
        (Outcome.ALLOW, None),
        (Outcome.DROP, "shedding/gated"),
        (Outcome.ALLOW, None),
        (Outcome.DROP, "shedding/gated"),
    ]
    noisy = await engine.on_event(conn, {}, event_context("noisy"))
    assert noisy.rule == "shedding/gated"  # first in policy order; no-load is never gated


async def test_a_closed_gate_restarts_the_sustained_clock() -> None:
    text = """
shedding:
  - {name: slow, hook: event, when: 'load.loop_lag_ms > 300 && event.priority == "normal"',
     action: drop, max_priority: normal, sustained_for: 10s}
"""
    clock = Clock()
    engine = Engine(policy(text), clock=clock)
    conn = conn_context(sid="s1", ip="192.0.2.1")

    async def at(seconds: float, lag: int) -> Outcome:
        clock.now = 100.0 + seconds
        engine.load = {**engine.load, "loop_lag_ms": lag}
        return (await engine.on_event(conn, {}, event_context("echo"))).outcome

    assert await at(0, 500) is Outcome.ALLOW  # the clock starts
    assert await at(6, 10) is Outcome.ALLOW  # the gate closes: the clock restarts
    assert await at(12, 500) is Outcome.ALLOW  # only 0 s sustained now
    assert await at(21, 500) is Outcome.ALLOW  # 9 s
    assert await at(23, 500) is Outcome.DROP  # 11 s


async def test_a_gate_that_fails_to_evaluate_leaves_the_rule_to_on_eval_error() -> None:
    text = """
defaults: {on_eval_error: fail_closed}
shedding:
  - name: broken
    hook: event
    when: 'int(load.loop_lag_ms) / int(load.memory_mb) > 1 && event.priority == "normal"'
    action: drop
    max_priority: normal
"""
    engine = Engine(policy(text), clock=Clock())
    engine.load = {**engine.load, "loop_lag_ms": 5, "memory_mb": 0}  # division by zero
    decision = await engine.on_event(conn_context(sid="s1"), {}, event_context("echo"))
    assert (decision.outcome, decision.rule) == (Outcome.DROP, "shedding/broken")


DELAYED_BUT_REFUSED = """
shedding:
  - {name: slow-down, hook: event, when: "load.loop_lag_ms > 100", action: delay, delay: 10ms,
     max_priority: critical}
authorization:
  rules:
    - {name: no-admin, hook: event, when: 'event.name == "admin"', effect: deny}
rate_limits:
  - {name: once, hook: event, when: 'event.name == "chat"', key: conn.sid, limit: 1/minute}
"""


async def test_a_delay_under_load_does_not_skip_authorization_or_rate_limits() -> None:
    engine, _ = engine_for(DELAYED_BUT_REFUSED)
    engine.load = {**engine.load, "loop_lag_ms": 500}
    client = conn()

    async def outcome(name: str) -> tuple[str, str | None]:
        decision = await engine.on_event(client, {}, event_context(name))
        return decision.outcome.value, decision.rule

    assert await outcome("admin") == ("reject", "authorization/no-admin")
    assert await outcome("chat") == ("delay", "shedding/slow-down")  # within its limit
    assert await outcome("chat") == ("reject", "rate_limits/once")
    assert await outcome("other") == ("delay", "shedding/slow-down")
    now = engine.judge_event_now(client, {}, event_context("admin"))
    assert now is not None
    assert now.decision.rule == "authorization/no-admin"


async def test_a_long_run_of_auth_failures_is_throttled_at_the_backoff_cap() -> None:
    # 3.0 ** 699 overflows a float: the delay must be capped, not raise.
    engine, clock = engine_for(
        "backoff:\n  steep: {strategy: exponential, base: 1s, max: 30s, multiplier: 3}\n"
        "connections:\n  auth_failures: {threshold: 1, window: 1h, backoff: steep}\n"
    )
    client = conn()
    for _ in range(700):
        await engine.record_auth_failure(client)
    clock.now += 1.0

    decision = await engine.on_connect(client, {})

    assert decision.rule == "connections/auth_failures"
    assert decision.payload is not None
    assert decision.payload["code"] == "AUTH_THROTTLED"
    assert decision.payload["retry_after_ms"] == 29_000
