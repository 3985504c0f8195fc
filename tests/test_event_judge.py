"""The event plans' prepared judges decide exactly as the general walk.

Two engines run the same generated policy over the same generated events, clocks, loads
and handler outcomes: one as it is (its prepared judges answer what they can), one with
its judges taken away, so that the walk judges everything. Every decision, every set of
breaker permits and, at the end, every rate-limit and breaker state must be the same.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from policy_engine.algorithms.ratelimit import SlidingLogState
from policy_engine.cel import CEL_PYTHON, available_backends
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.breakers import BreakerGuard
from policy_engine.core.decision import Decision
from policy_engine.core.engine import Engine, EventVerdict, conn_context, event_context
from policy_engine.core.event_judge import PlanJudge
from policy_engine.language.contexts import LOAD, Hook
from policy_engine.language.model import PolicySet
from policy_engine.state.memory import MemoryStore

SCHEMA = {
    "type": "object",
    "required": ["action"],
    "properties": {"action": {"type": "string", "minLength": 1}, "n": {"type": "integer"}},
}

CONDITIONS = [
    None,
    'event.name == "act"',
    'event.name == "act" && has(event.payload.n) && event.payload.n > 2',
    'claims.role == "viewer"',
    'event.name in ["act", "tele"]',
    'has(claims.role) && claims.role == "editor"',
]
KEYS = [
    "conn.sid",
    'conn.user_id + ":" + conn.conversation_id',
    "event.payload.k",  # fails where the payload has no k: the walk's key error
    "claims.role",
]
MATCHES = [
    'event.name == "act"',
    'event.name == "act" && claims.role == "editor"',
    'event.name == "tele"',
    "has(event.payload.n)",
]
AUTHORIZATION = [
    'event.name == "act" && claims.role == "viewer"',
    'claims.role == "admin"',
    "has(event.payload.n) && event.payload.n == 7",
    'event.name == "tele"',
]


def generated_policy(r: random.Random) -> str:
    """A policy text drawing rules of every kind an event meets from the lists above."""
    lines = [
        "version: 1",
        "events:",
        f"  act: {{schema: schema.json, max_bytes: 200, priority: {r.choice(PRIORITIES)}}}",
        f"  tele: {{max_bytes: 100, priority: {r.choice(PRIORITIES)}}}",
        '  "*": {max_bytes: 150}',
        "rate_limits:",
    ]
    for at in range(r.randint(0, 3)):
        rule = {
            "name": f"limit-{at}",
            "hook": "event",
            "key": r.choice(KEYS),
            "limit": r.choice(["3/second", "5/10s", "2/s", "4/minute"]),
            "algorithm": r.choice(["gcra", "sliding_window", "fixed_window"]),
            "mode": r.choice(["enforce", "shadow"]),
            "on_eval_error": r.choice(["fail_closed", "fail_open"]),
        }
        if rule["algorithm"] == "gcra" and r.random() < 0.5:
            rule["burst"] = r.randint(1, 4)
        when = r.choice(CONDITIONS)
        if when is not None:
            rule["when"] = when
        lines.append(f"  - {json.dumps(rule)}")
    if lines[-1] == "rate_limits:":
        lines.pop()
    breakers = []
    for at in range(r.randint(0, 2)):
        breaker: dict[str, Any] = {
            "name": f"breaker-{at}",
            "match": r.choice(MATCHES),
            "failure_rate": r.choice(["50%", "20%", "100%"]),
            "window": r.choice([{"calls": 4}, {"time": "5s"}]),
            "minimum_calls": 2,
            "open_for": "1s",
            "half_open_calls": r.randint(1, 2),
            "mode": r.choice(["enforce", "shadow"]),
        }
        if r.random() < 0.5:
            breaker["slow_call"] = {"over": "100ms", "rate": r.choice(["50%", "100%"])}
        if r.random() < 0.3:
            breaker["fallback"] = {"ok": False}
        breakers.append(f"  - {json.dumps(breaker)}")
    if breakers:
        lines += ["circuit_breakers:", *breakers]
    lines += ["authorization:", f"  default: {r.choice(['allow', 'allow', 'deny'])}"]
    rules = []
    for at in range(r.randint(0, 3)):
        rule = {
            "name": f"rule-{at}",
            "hook": "event",
            "when": r.choice(AUTHORIZATION),
            "effect": r.choice(["allow", "deny", "deny"]),
            "mode": r.choice(["enforce", "shadow"]),
        }
        rules.append(f"    - {json.dumps(rule)}")
    if rules:
        lines += ["  rules:", *rules]
    if r.random() < 0.5:
        action = r.choice(["drop", "delay"])
        lines += [
            "shedding:",
            '  - {name: shed, hook: event, when: "load.overloaded && event.priority != \\"high\\"",'
            f" action: {action}, max_priority: {r.choice(PRIORITIES)}"
            + (", delay: 10ms}" if action == "delay" else "}"),
        ]
    return "\n".join(lines) + "\n"


PRIORITIES = ["low", "normal", "high"]
PAYLOADS: list[Any] = [
    {"action": "run", "n": 3, "k": "a"},
    {"action": "run", "n": 7},
    {"action": "", "k": "b"},
    {"n": "three"},
    {"action": "go", "k": "a"},
    None,
    [1, 2],
]
CLAIMS = [{"sub": "u1", "role": "viewer"}, {"sub": "u2", "role": "editor"}, {"sub": "u3"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def compiled(text: str, folder: Path, backend: str | None = None) -> PolicySet:
    (folder / "schema.json").write_text(json.dumps(SCHEMA))
    result = compile_text(text, base_dir=folder, backend=backend)
    assert result.policy is not None, [str(d) for d in result.diagnostics]
    return result.policy


def walk_only(engine: Engine) -> Engine:
    """The engine without its prepared judges: every event takes the general walk."""
    engine._judges = {}
    engine._other_judge = None
    return engine


def plain(decision: Decision) -> tuple[Any, ...]:
    """A decision without what differs by construction (a refusal's correlation id)."""
    payload = None
    if decision.payload is not None:
        payload = {k: v for k, v in decision.payload.items() if k != "correlation_id"}
    shown = decision.outcome, decision.rule, payload, decision.delay, decision.shadowed
    return (*shown, decision.key)


def guard_of(guard: BreakerGuard | None) -> Any:
    if guard is None:
        return None
    return ([spec.name for spec in guard.permits], guard.started, guard.transitions)


def states(engine: Engine) -> Any:
    store = engine.local
    rates = {
        name: {
            key: state.log if isinstance(state, SlidingLogState) else state
            for key, state in table.states.items()
        }
        for name, table in store._rates.items()
    }
    return rates, dict(store._breakers)


class Counted:
    """Counts the events a prepared judge decided (so the comparison is not walk to walk)."""

    def __init__(self) -> None:
        self.decided = 0
        self.original = PlanJudge.decide

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = self.original

        def decide(judge: PlanJudge, *args: Any) -> Decision | None:
            decided = original(judge, *args)
            self.decided += decided is not None
            return decided

        monkeypatch.setattr(PlanJudge, "decide", decide)


async def one_event(  # noqa: PLR0917 (one step's every draw)
    engine: Engine,
    conn: dict[str, Any],
    claims: dict[str, Any],
    event: dict[str, Any],
    failure: Exception | None,
    took: float,
    clock: Clock,
    *,
    one_call: bool,
) -> Any:
    """One event through either way into the engine, its handler's outcome reported."""
    guard: BreakerGuard | None = None
    if one_call:
        verdict = engine.judge_event_now(conn, claims, event)
        assert isinstance(verdict, EventVerdict)
        decision, guard = verdict.decision, verdict.guard
        if guard is None and decision.allowed:
            permits = await engine.before_call(conn, claims, event)
            decision, guard = (
                (permits, None) if isinstance(permits, Decision) else (decision, permits)
            )
    else:
        decision = await engine.on_event(conn, claims, event)
        if decision.allowed:
            permits = await engine.before_call(conn, claims, event)
            decision, guard = (
                (permits, None) if isinstance(permits, Decision) else (decision, permits)
            )
    transitions = None
    if guard is not None and guard.permits:
        clock.now += took
        classification = error = None
        if failure is not None:
            classification, _, error = engine.on_error(failure, Hook.EVENT, conn, claims, event)
        transitions = await engine.after_call(guard, conn, event, classification, error)
    return plain(decision), guard_of(guard), transitions, event["priority"]


async def run_pair(seed: int, folder: Path, *, one_call: bool, backend: str | None = None) -> None:
    r = random.Random(seed)
    text = generated_policy(r)
    policy = compiled(text, folder, backend)
    clocks = Clock(), Clock()
    prepared = Engine(policy, MemoryStore(), clock=clocks[0])
    walk = walk_only(Engine(policy, MemoryStore(), clock=clocks[1]))
    conns = [
        conn_context(sid=f"s{i}", ip="192.0.2.1", user_id=f"u{i}", conversation_id="c")
        for i in range(3)
    ]
    calm = LOAD.defaults()
    overloaded = {**calm, "overloaded": True}
    for step in range(150):
        which = r.randrange(3)
        name = r.choice(["act", "act", "tele", "other"])
        payload = r.choice(PAYLOADS)
        size = r.choice([10, 10, 10, 120, 180, 260])
        advance = r.choice([0.0, 0.01, 0.1, 0.4, 1.5])
        load = overloaded if r.random() < 0.15 else calm
        failure = r.choice([None, None, ValueError("bad"), RuntimeError("down")])
        took = r.choice([0.0, 0.0, 0.2])
        answers = []
        for engine, clock in ((prepared, clocks[0]), (walk, clocks[1])):
            clock.now += advance
            engine.load = load
            event = event_context(name, payload, size_bytes=size, has_ack=True)
            answer = await one_event(
                engine, conns[which], CLAIMS[which], event, failure, took, clock, one_call=one_call
            )
            answers.append(answer)
        assert answers[0] == answers[1], f"step {step} of\n{text}"
    assert states(prepared) == states(walk), text


@pytest.mark.parametrize("one_call", [True, False], ids=["judge_event_now", "hooks"])
async def test_prepared_judges_decide_as_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_call: bool
) -> None:
    counted = Counted()
    counted.install(monkeypatch)
    for seed in range(60):
        await run_pair(seed, tmp_path, one_call=one_call)
    # Most events were decided by a judge: the comparison was not the walk against itself.
    assert counted.decided > 60 * 150 // 4


@pytest.mark.skipif(CEL_PYTHON not in available_backends(), reason="needs cel-python")
async def test_prepared_judges_decide_as_the_walk_on_the_pure_python_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its programs have no fast-path closure: the judges call their ``evaluate``."""
    counted = Counted()
    counted.install(monkeypatch)
    for seed in range(12):
        await run_pair(seed, tmp_path, one_call=True, backend=CEL_PYTHON)
    # Conditions that convert the event leave some plans to the walk; many are prepared.
    assert counted.decided > 12 * 150 // 10


async def test_the_shipped_every_rule_event_is_prepared() -> None:
    shipped = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"
    policy = compile_text(shipped.read_text(), base_dir=shipped.parent).policy
    assert policy is not None
    engine = Engine(policy)
    assert engine._judges["oh_user_action"] is not None
    assert walk_only(Engine(policy))._judges == {}
