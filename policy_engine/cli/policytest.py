"""Policy unit tests written in YAML, in the spirit of ``opa test``.

A test file names the policy it tests and a list of cases. Each case starts from a fresh
engine on the memory store with a clock that only moves when the case says so, replays
its ``given`` steps (prior connects, events, handler failures), runs one hook and compares
the decision with ``expect``::

    policy: ../policies.yaml
    tests:
      - name: the 51st action within a second is refused
        given:
          - hook: event
            context: {event: {name: oh_user_action, payload: {action: x}}}
            repeat: 50
        hook: event
        context: {event: {name: oh_user_action, payload: {action: x}}}
        expect: {outcome: reject, code: RATE_LIMITED, retry_after_ms: 20}

The runner is a library (``run_file`` returns results); the CLI only reports them.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.decision import Decision
from policy_engine.core.engine import Engine
from policy_engine.core.explain import ContextError, build_context, record_call, run_hook
from policy_engine.errors import PolicyEngineError, PolicyError, UnitError
from policy_engine.language.contexts import Hook
from policy_engine.language.model import PolicySet
from policy_engine.language.source import load_source
from policy_engine.language.units import parse_duration

_EXPECT_KEYS = frozenset(
    {"outcome", "rule", "code", "category", "retryable", "retry_after_ms", "delay_ms", "shadowed"}
)
_PAYLOAD_KEYS = frozenset({"code", "category", "retryable", "retry_after_ms"})
START = 1_000.0


class PolicyTestError(PolicyEngineError):
    """A test file that cannot be run (not a mistake of the policy under test)."""


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    failures: tuple[str, ...] = ()
    decision: Mapping[str, Any] = field(default_factory=dict)


class _Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def run_file(
    path: str | Path, *, backend: str | None = None, explain: bool = True
) -> list[CaseResult]:
    """Run every case of one test file; ``explain=False`` runs the hooks untraced, through
    the request path's own entry points (the decisions must not differ)."""
    document = load_source(path)
    data = document.data
    if not isinstance(data, Mapping) or "policy" not in data or "tests" not in data:
        raise PolicyTestError(f"{path}: a test file needs `policy:` and `tests:`")
    policy_path = Path(path).parent / str(data["policy"])
    try:
        policy = compile_file(policy_path, backend=backend).policy
    except PolicyError as exc:
        raise PolicyTestError(f"{path}: the policy under test is invalid:\n{exc}") from exc
    cases = data["tests"]
    if not isinstance(cases, list) or not cases:
        raise PolicyTestError(f"{path}: `tests:` must be a non-empty list")
    return [asyncio.run(_run_case(str(path), policy, case, explain)) for case in cases]


async def _run_case(
    file: str, policy: PolicySet, case: Mapping[str, Any], explain: bool
) -> CaseResult:
    name = str(case.get("name", "unnamed"))
    clock = _Clock()
    engine = Engine(policy, clock=clock, rand=lambda: 0.5)
    try:
        for step in case.get("given", []):
            await _run_step(engine, clock, step)
        if "advance" in case:
            clock.now += parse_duration(case["advance"])
        hook = Hook(case["hook"])
        decision = await run_hook(engine, hook, build_context(_context(case)), explain=explain)
    except (ContextError, UnitError, ValueError, KeyError, TypeError) as exc:
        return CaseResult(file, name, False, (f"cannot run: {exc}",))
    failures = _compare(case.get("expect", {}), decision)
    return CaseResult(file, name, not failures, tuple(failures), decision.to_dict())


async def _run_step(engine: Engine, clock: _Clock, step: Mapping[str, Any]) -> None:
    """A prior step, ``repeat`` times: a hook, a handler outcome or an authentication failure."""
    repeat = int(step.get("repeat", 1))
    every = parse_duration(step.get("every", 0))
    for _ in range(repeat):
        if "advance" in step:
            clock.now += parse_duration(step["advance"])
        contexts = build_context(_context(step))
        if step.get("auth_failure"):
            await engine.record_auth_failure(contexts["conn"])
        elif "call" in step:
            call = step["call"]
            error = build_context({"error": call["error"]})["error"] if "error" in call else None
            duration = parse_duration(call.get("duration", "0s"))
            await record_call(engine, contexts, error=error, duration=duration)
        elif "hook" in step:
            await run_hook(engine, Hook(step["hook"]), contexts, explain=False)
        clock.now += every


def _context(step: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(step.get("context", {})))


def _compare(expect: Mapping[str, Any], decision: Decision) -> list[str]:
    unknown = set(expect) - _EXPECT_KEYS
    if unknown:
        return [f"unknown expectation keys: {', '.join(sorted(unknown))}"]
    actual: dict[str, Any] = {
        "outcome": decision.outcome.value,
        "rule": decision.rule,
        "delay_ms": round(decision.delay * 1000),
        "shadowed": list(decision.shadowed),
    }
    payload = decision.payload or {}
    for key in _PAYLOAD_KEYS:
        actual[key] = payload.get(key)
    return [
        f"{key}: expected {value!r}, got {actual[key]!r}"
        for key, value in expect.items()
        if actual[key] != value
    ]


def discover(paths: Sequence[str | Path]) -> list[Path]:
    """Test files: the given files, and ``*_test.yaml`` / ``test_*.yaml`` below folders."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found += sorted({*entry.rglob("*_test.yaml"), *entry.rglob("test_*.yaml")})
        else:
            found.append(entry)
    return found
