from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from policy_engine.compiler.pipeline import CompileResult, compile_file
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import Engine, conn_context, event_context
from policy_engine.errors import Diagnostic
from policy_engine.language.contexts import Hook
from policy_engine.observe.observer import NullObserver
from policy_engine.server.reload import PolicyReloader

POLICY = """\
version: 1
rate_limits:
  - name: per-ip
    hook: connect
    key: conn.ip
    limit: 5/minute
  - name: per-user
    hook: connect
    key: conn.user_id
    limit: {user_limit}/minute
circuit_breakers:
  - name: backend
    match: event.name == "work"
    failure_rate: 50%
    window: {{calls: 4}}
    minimum_calls: 2
    open_for: 30s
"""

# Two misspelt fields: line 5, column 14 and line 9, column 14.
BROKEN = """\
version: 1
rate_limits:
  - name: per-ip
    hook: connect
    key: conn.ipp
    limit: 5/minute
  - name: per-user
    hook: connect
    key: conn.usr
    limit: 5/minute
"""


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.reloads: list[tuple[bool, str | None, str, tuple[Diagnostic, ...]]] = []

    def reload(
        self, ok: bool, version: str | None, path: str, diagnostics: Sequence[Diagnostic]
    ) -> None:
        self.reloads.append((ok, version, path, tuple(diagnostics)))


class FixedClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICY.format(user_limit=100), encoding="utf-8")
    return path


def engine_for(path: Path, clock: FixedClock | None = None) -> Engine:
    return Engine(compile_file(path).policy, clock=clock or FixedClock())


async def connects_allowed(engine: Engine, attempts: int) -> int:
    allowed = 0
    for i in range(attempts):
        conn = conn_context(sid=f"s{i}", ip="203.0.113.9", user_id="ada")
        decision = await engine.on_connect(conn, {})
        allowed += decision.allowed
    return allowed


def test_a_valid_change_is_swapped_in_and_reported(policy_file: Path) -> None:
    engine = engine_for(policy_file)
    old = engine.policy
    recorder = Recorder()
    wall = FixedClock(50.0)
    reloader = PolicyReloader(policy_file, engine, recorder, wall_clock=wall)
    policy_file.write_text(POLICY.format(user_limit=7), encoding="utf-8")
    wall.now = 60.0

    assert reloader.reload() is True

    assert engine.policy.version != old.version
    assert engine.policy.rate_limits[1].rate.limit == 7
    assert (reloader.succeeded, reloader.failed, reloader.loaded_at) == (1, 0, 60.0)
    assert recorder.reloads == [(True, engine.policy.version, str(policy_file), ())]


def test_an_invalid_file_is_rejected_whole_with_every_diagnostic(policy_file: Path) -> None:
    engine = engine_for(policy_file)
    running = engine.policy
    recorder = Recorder()
    wall = FixedClock(50.0)
    reloader = PolicyReloader(policy_file, engine, recorder, wall_clock=wall)
    policy_file.write_text(BROKEN, encoding="utf-8")
    wall.now = 60.0

    assert reloader.reload() is False

    assert engine.policy is running
    assert (reloader.succeeded, reloader.failed, reloader.loaded_at) == (0, 1, 50.0)
    ((ok, version, path, diagnostics),) = recorder.reloads
    assert (ok, version, path) == (False, None, str(policy_file))
    shown = [str(d) for d in diagnostics]
    assert [line.split(": error: ")[0] for line in shown] == [
        f"{policy_file}:5:14",
        f"{policy_file}:9:14",
    ]
    assert reloader.last_failure == diagnostics


def test_a_missing_file_keeps_the_running_policy(policy_file: Path) -> None:
    engine = engine_for(policy_file)
    running = engine.policy
    recorder = Recorder()
    reloader = PolicyReloader(policy_file, engine, recorder)
    policy_file.unlink()

    assert reloader.reload() is False
    assert engine.policy is running
    assert reloader.failed == 1
    assert str(recorder.reloads[0][3][0]).startswith(str(policy_file))


def test_a_crashing_compiler_is_a_failed_reload_not_a_crash(policy_file: Path) -> None:
    def explode(path: Path) -> CompileResult:
        raise RuntimeError("boom")

    engine = engine_for(policy_file)
    recorder = Recorder()
    reloader = PolicyReloader(policy_file, engine, recorder, compiler=explode)

    assert reloader.reload() is False
    (diagnostic,) = recorder.reloads[0][3]
    assert "boom" in diagnostic.message


async def test_rate_limit_budget_carries_over_when_another_rule_changes(
    policy_file: Path,
) -> None:
    engine = engine_for(policy_file)
    reloader = PolicyReloader(policy_file, engine)
    assert await connects_allowed(engine, 3) == 3

    policy_file.write_text(POLICY.format(user_limit=90), encoding="utf-8")
    assert reloader.reload() is True

    # per-ip allows 5 a minute: 3 were used before the reload, so 2 remain after it.
    assert await connects_allowed(engine, 5) == 2


async def test_breaker_state_carries_over_a_reload(policy_file: Path) -> None:
    engine = engine_for(policy_file)
    reloader = PolicyReloader(policy_file, engine)
    conn = conn_context(sid="s1", ip="203.0.113.9", user_id="ada")
    event = event_context("work")
    for _ in range(2):
        guard = await engine.before_call(conn, {}, event)
        assert not isinstance(guard, Decision)
        classification, _, error = engine.on_error(TimeoutError("slow"), Hook.EVENT, conn, {})
        await engine.after_call(guard, conn, event, classification, error)
    refused = await engine.before_call(conn, {}, event)
    assert isinstance(refused, Decision)

    policy_file.write_text(POLICY.format(user_limit=90), encoding="utf-8")
    assert reloader.reload() is True

    still_refused = await engine.before_call(conn, {}, event)
    assert isinstance(still_refused, Decision)
    assert still_refused.outcome is Outcome.REJECT
    assert still_refused.rule == "circuit_breakers/backend"


async def test_reload_async_compiles_off_the_event_loop_thread(policy_file: Path) -> None:
    threads: list[int] = []

    def compiler(path: Path) -> CompileResult:
        threads.append(threading.get_ident())
        return compile_file(path)

    engine = engine_for(policy_file)
    reloader = PolicyReloader(policy_file, engine, compiler=compiler)
    policy_file.write_text(POLICY.format(user_limit=9), encoding="utf-8")

    assert await reloader.reload_async() is True
    assert threads != [threading.get_ident()]
    assert engine.policy.rate_limits[1].rate.limit == 9


async def test_sighup_reloads_the_file(policy_file: Path) -> None:
    engine = engine_for(policy_file)
    recorder = Recorder()
    reloader = PolicyReloader(policy_file, engine, recorder)
    loop = asyncio.get_running_loop()
    policy_file.write_text(POLICY.format(user_limit=11), encoding="utf-8")
    reloader.install_sighup(loop)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(500):
            if recorder.reloads:
                break
            await asyncio.sleep(0.01)
        await reloader.wait_idle()
    finally:
        reloader.remove_sighup(loop)
    assert [ok for ok, *_ in recorder.reloads] == [True]
    assert engine.policy.rate_limits[1].rate.limit == 11


async def test_signals_during_a_reload_collapse_into_one_more(policy_file: Path) -> None:
    release = threading.Event()
    calls: list[int] = []

    def slow_compiler(path: Path) -> CompileResult:
        calls.append(1)
        release.wait(timeout=10)
        return compile_file(path)

    engine = engine_for(policy_file)
    reloader = PolicyReloader(policy_file, engine, compiler=slow_compiler)
    reloader.request_reload()
    await asyncio.sleep(0)
    for _ in range(3):
        reloader.request_reload()
    release.set()
    await reloader.wait_idle()

    assert len(calls) == 2
    assert reloader.succeeded == 2


def test_a_failing_listener_does_not_undo_the_swap(policy_file: Path) -> None:
    def broken_listener(policy: object) -> None:
        raise ValueError("listener bug")

    engine = engine_for(policy_file)
    reloader = PolicyReloader(policy_file, engine, on_install=[broken_listener])
    policy_file.write_text(POLICY.format(user_limit=12), encoding="utf-8")

    assert reloader.reload() is True
    assert engine.policy.rate_limits[1].rate.limit == 12
