"""The decision log's file handling: rotation, sampling, reconfiguration on reload.

The live recording and masking are tested against a real server in ``test_replay.py``;
these drive :class:`DecisionLog` with decisions of a real engine and read the files back.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import Engine, conn_context, event_context
from policy_engine.language.model import PolicySet
from policy_engine.observe.decision_log import DecisionLog, read_judgements


def policy(section: str) -> PolicySet:
    return compile_text(f"version: 1\n{section}").policy


async def decide(log: DecisionLog, engine: Engine, events: int) -> None:
    engine.tap = log
    conn = conn_context(sid="s1", ip="192.0.2.1", headers={"authorization": "Bearer t"})
    await engine.on_connect(conn, {})
    for n in range(events):
        await engine.on_event(conn, {}, event_context("echo", {"n": n}))
    await engine.on_disconnect(conn)


async def test_a_log_past_max_bytes_is_rotated_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    spec = f"decision_log:\n  path: {path}\n  max_bytes: 2KB\n  backups: 2\n"
    current = policy(spec)
    log = DecisionLog(current)
    await decide(log, Engine(current), 40)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "decisions.jsonl",
        "decisions.jsonl.1",
        "decisions.jsonl.2",
    ]
    for file in tmp_path.iterdir():
        lines = file.read_text(encoding="utf-8").splitlines()
        assert lines
        assert all(len(list(read_judgements([line]))) == 1 for line in lines)
        assert "Bearer t" not in file.read_text(encoding="utf-8")
    assert path.stat().st_size <= 2_000 + 1_000  # rotated once past the bound
    assert log.written == 42  # a connect, 40 events and a disconnect


async def test_a_sample_writes_that_share_and_every_disconnect(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    current = policy(f"decision_log:\n  path: {path}\n  sample: 50%\n")
    draws = itertools.cycle([0.1, 0.9])  # in, out, in, out, ...
    log = DecisionLog(current, rand=lambda: next(draws))
    await decide(log, Engine(current), 9)
    log.close()
    hooks = [json.loads(line)["hook"] for line in path.read_text("utf-8").splitlines()]
    assert hooks == ["connect", *["event"] * 4, "disconnect"]  # 5 of 10, and the close


async def test_a_reload_moves_the_log_or_turns_it_off(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    log = DecisionLog(policy(f"decision_log:\n  path: {first}\n"))
    engine = Engine(log_policy := policy(f"decision_log:\n  path: {first}\n"))
    await decide(log, engine, 1)
    moved = policy(f"decision_log:\n  path: {second}\n")
    log.configure(moved)
    await decide(log, engine, 2)
    log.configure(policy(""))
    assert not log.active
    await decide(log, engine, 3)
    log.close()
    assert len(first.read_text("utf-8").splitlines()) == 3
    lines = [json.loads(line) for line in second.read_text("utf-8").splitlines()]
    assert len(lines) == 4
    assert {line["policy_version"] for line in lines} == {moved.version}
    assert log_policy.version != moved.version
