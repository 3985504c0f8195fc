"""The checked payload conditions read: what is refused, what is kept, what it may cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from policy_engine.cel import SharedContext, get_backend
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import Engine, PendingEvent, conn_context, event_context
from policy_engine.core.payload_view import VALUE_BUDGET, payload_problem, views_for
from policy_engine.language.contexts import HOOK_VARIABLES, Hook
from policy_engine.state.memory import MemoryStore


class RemoteStore:
    """A shared store: a memory store reached only through the protocol."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (2**64, "64-bit"),
        (-(2**63) - 1, "64-bit"),
        ("\ud800", "surrogate"),
        ({"\udfff": 1}, "surrogate"),
        ("a\x00b", "NUL"),
        ((1, 2), "tuple"),
    ],
)
def test_values_cel_cannot_take_as_they_are_are_named(value: Any, problem: str) -> None:
    found = payload_problem([{"deep": [[value]]}], VALUE_BUDGET)
    assert found is not None
    assert problem in found


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), "é ✓ 😀", 1.5, None, True, b"raw"])
def test_values_cel_takes_pass(value: Any) -> None:
    assert payload_problem([{"deep": [[value]]}], VALUE_BUDGET) is None


def test_the_walk_stops_at_the_budget() -> None:
    assert payload_problem([[0] * 10], 11) is None
    assert payload_problem([[0] * 10], 10) is not None
    assert payload_problem([[[[[0]]]]], 4) is not None  # nesting counts, one per level


def engine_for(rules: str) -> Engine:
    return Engine(compile_text("version: 1\n" + rules).policy, clock=lambda: 100.0)


FILTER_RULE = """
authorization:
  rules:
    - name: no-sudo
      hook: event
      when: 'event.payload.tags.filter(t, t == "sudo").size() > 0'
      effect: deny
"""


async def test_a_filter_over_a_client_list_costs_the_square_of_its_length() -> None:
    engine = engine_for(FILTER_RULE)
    conn = conn_context(sid="s1", ip="192.0.2.1")
    short = await engine.on_event(conn, {}, event_context("x", {"tags": ["a"] * 50}))
    long = await engine.on_event(conn, {}, event_context("x", {"tags": ["a"] * 100}))
    assert short.allowed
    assert long.payload is not None
    assert long.payload["code"] == "PAYLOAD_TOO_COMPLEX"


def test_only_the_keys_conditions_select_are_kept() -> None:
    policy = compile_text(
        "version: 1\n"
        "authorization:\n  rules:\n"
        "    - {name: a, hook: event, when: 'event.payload.cmd.matches(\"rm\")', effect: deny}\n"
        "    - {name: b, hook: event, when: 'has(event.payload.user)', effect: deny}\n"
    ).policy
    view = views_for(policy)[""]
    assert view is not None
    assert view.keys == {"cmd", "user"}


def test_an_event_no_converting_condition_reads_is_not_walked() -> None:
    policy = compile_text(
        "version: 1\n"
        "authorization:\n  rules:\n"
        "    - {name: a, hook: event, when: 'event.payload.cmd == \"rm\"', effect: deny}\n",
        backend="cel-expr-python",  # whose fast path reads plain values
    ).policy
    assert views_for(policy) == {}


def test_a_shared_context_is_converted_once_for_every_program_reading_it() -> None:
    backend = get_backend("cel-expr-python")
    variables = HOOK_VARIABLES[Hook.EVENT]
    first = backend.compile('event.payload.cmd.matches("rm")', variables)
    second = backend.compile('event.payload.tags.exists(t, t == "admin")', variables)
    context = SharedContext(
        {"conn": {}, "claims": {}, "load": {}, "event": {"payload": {"cmd": "rm", "tags": []}}}
    )
    assert first.evaluate(context) is True
    converted = context.converted
    assert converted is not None
    assert second.evaluate(context) is False
    assert context.converted is converted
    context["event"] = {"payload": {"cmd": "ls", "tags": ["admin"]}}  # a new event: anew
    assert (first.evaluate(context), second.evaluate(context)) == (False, True)


async def test_a_breaker_condition_reads_the_checked_payload() -> None:
    engine = engine_for(
        "circuit_breakers:\n  - {name: b, match: 'event.payload.cmd.matches(\"rm\")'}\n"
    )
    conn = conn_context(sid="s1", ip="192.0.2.1")
    padded = event_context("x", {"cmd": "rm", "pad": 2**64})
    hidden = event_context("x", {"cmd": "ls\x00rm"})
    guard = await engine.before_call(conn, {}, padded)
    refused = await engine.before_call(conn, {}, hidden)
    assert [spec.name for spec in guard.permits] == ["b"]  # type: ignore[union-attr]
    assert refused.payload["code"] == "INVALID_PAYLOAD"  # type: ignore[union-attr]


async def test_on_a_shared_store_a_client_over_its_limit_costs_no_validation(
    tmp_path: Path,
) -> None:
    (tmp_path / "run.json").write_text('{"type": "object", "required": ["cmd"]}')
    policy = compile_text(
        "version: 1\n"
        "events:\n  run: {schema: run.json}\n"
        "rate_limits:\n  - {name: l, hook: event, key: conn.sid, limit: 1/minute}\n",
        base_dir=tmp_path,
    ).policy
    spec = policy.events["run"]
    validations: list[Any] = []
    validate = spec.validate

    def counting(payload: Any) -> Any:
        validations.append(payload)
        return validate(payload)

    object.__setattr__(spec, "validate", counting)
    engine = Engine(policy, RemoteStore(), clock=lambda: 100.0)
    conn = conn_context(sid="s1", ip="192.0.2.1")
    verdict = engine.judge_event_now(conn, {}, event_context("run", {"cmd": "ls"}))
    assert isinstance(verdict, PendingEvent)  # the limit is the shared store's to answer
    first = await engine.settle_event(verdict)

    over = [await engine.on_event(conn, {}, event_context("run", {"cmd": "ls"})) for _ in "ab"]

    assert first.allowed
    assert [d.rule for d in over] == ["rate_limits/l", "rate_limits/l"]
    assert len(validations) == 1  # the first event's, once its limit was answered
