"""The decision log and ``policy-engine replay``, on logs recorded from a real server.

Each test records its own log: real Socket.IO clients against ``build_app`` (the server
``policy-engine serve`` runs) under a policy with a ``decision_log`` section. The central
check compares a replay with a live run: the decisions a tightened limit refuses when
replayed over the loose run's log are exactly those it refuses live.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
import socketio
from servers import WAIT, Clients, LiveServer

from policy_engine.cli.main import main
from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.rejudge import ALLOWED_TO_REFUSED, REFUSED_TO_ALLOWED, Change, rejudge_all
from policy_engine.observe.decision_log import MASK, read_judgements
from policy_engine.server.app import build_app

POLICY = """\
version: 1
decision_log:
  path: {log}
  redact: [event.payload.email, conn.query.conversation_id, conn.conversation_id]
rate_limits:
  - name: echo-limit
    hook: event
    when: event.name == "echo"
    key: conn.sid
    limit: {limit}
    burst: {burst}
"""
LOOSE = {"limit": "1000/minute", "burst": 1000}
TIGHT = {"limit": "4/minute", "burst": 4}
CLIENTS = 3
EVENTS = 8


def write_policy(path: Path, log: Path, limit: str, burst: int) -> Path:
    path.write_text(POLICY.format(log=log, limit=limit, burst=burst), encoding="utf-8")
    return path


async def record(policy: Path) -> set[tuple[int, int]]:
    """Serve ``policy``, let three clients send eight ``echo`` each (one at a time, each
    waiting for its answer), stop; the (client, n) of every event refused live."""
    sio = socketio.AsyncServer(async_mode="asgi")

    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data

    server = build_app(sio, policy, sample_interval=0.05)
    live = LiveServer(server)
    live.start()
    clients = Clients()
    refused: set[tuple[int, int]] = set()
    try:
        for c in range(CLIENTS):
            client, _ = await clients.connect(
                live.url,
                query={"conversation_id": "private-room"},
                headers={"Cookie": "session=s3cr3t-cookie", "X-Trace": "visible"},
            )
            for n in range(EVENTS):
                payload = {"client": c, "n": n, "email": "ann@example.com", "token": "tok-123"}
                answer = await client.call("echo", payload, timeout=WAIT)
                if isinstance(answer, dict) and "code" in answer:
                    assert answer["code"] == "RATE_LIMITED"
                    refused.add((c, n))
            await client.disconnect()
    finally:
        await clients.close()
        live.stop()
    return refused


def identity(change: Change) -> tuple[int, int]:
    payload = (change.judgement.event or {})["payload"]
    return payload["client"], payload["n"]


@pytest.fixture
async def runs(tmp_path: Path) -> dict[str, Any]:
    """A loose run and a tight run, each with its log and the refusals clients saw."""
    loose_log, tight_log = tmp_path / "loose.jsonl", tmp_path / "tight.jsonl"
    loose = write_policy(tmp_path / "loose.yaml", loose_log, **LOOSE)
    tight = write_policy(tmp_path / "tight.yaml", tight_log, **TIGHT)
    return {
        "loose": loose,
        "tight": tight,
        "loose_log": loose_log,
        "tight_log": tight_log,
        "loose_refused": await record(loose),
        "tight_refused": await record(tight),
    }


async def replayed(policy: Path, log: Path) -> tuple[Any, list[Change]]:
    changes: list[Change] = []
    lines = log.read_text(encoding="utf-8").splitlines()
    summary = await rejudge_all(
        compile_file(policy).policy, read_judgements(lines), on_change=changes.append
    )
    return summary, changes


async def test_replaying_a_tightened_limit_refuses_exactly_what_it_refuses_live(
    runs: dict[str, Any],
) -> None:
    assert runs["loose_refused"] == set()
    expected = {(c, n) for c in range(CLIENTS) for n in range(TIGHT["burst"], EVENTS)}
    assert runs["tight_refused"] == expected  # the live run with the tight limit

    summary, changes = await replayed(runs["tight"], runs["loose_log"])
    assert {identity(change) for change in changes} == runs["tight_refused"]
    assert {change.kind for change in changes} == {ALLOWED_TO_REFUSED}
    assert {(change.rule, change.before, change.after) for change in changes} == {
        ("rate_limits/echo-limit", "allow", "RATE_LIMITED")
    }
    # Every connect, event and disconnect was logged and judged again.
    assert summary.judged == CLIENTS * (1 + EVENTS)
    assert summary.skipped == 0

    # And the other way round: the loose policy would have let the tight run's refusals in.
    _, loosened = await replayed(runs["loose"], runs["tight_log"])
    assert {identity(change) for change in loosened} == runs["tight_refused"]
    assert {change.kind for change in loosened} == {REFUSED_TO_ALLOWED}


async def test_the_enforced_policy_replayed_over_its_own_log_changes_nothing(
    runs: dict[str, Any],
) -> None:
    for policy, log in (("loose", "loose_log"), ("tight", "tight_log")):
        summary, changes = await replayed(runs[policy], runs[log])
        assert changes == []
        assert summary.judged == CLIENTS * (1 + EVENTS)


async def test_the_log_masks_secrets_and_redacted_fields(runs: dict[str, Any]) -> None:
    text = runs["loose_log"].read_text(encoding="utf-8")
    for secret in ("s3cr3t-cookie", "tok-123", "ann@example.com", "private-room"):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]
    version = compile_file(runs["loose"]).policy.version
    assert {line["policy_version"] for line in lines} == {version}
    assert [line["hook"] for line in lines[: 2 + EVENTS]] == [
        "connect",
        *["event"] * EVENTS,
        "disconnect",
    ]
    event = lines[1]
    assert event["outcome"] == "allow"
    assert event["context"]["event"]["payload"] == {
        "client": 0,
        "n": 0,
        "email": MASK,
        "token": MASK,
    }
    headers = event["context"]["conn"]["headers"]
    assert headers["cookie"] == MASK
    assert headers["x-trace"] == "visible"
    assert event["context"]["conn"]["query"]["conversation_id"] == MASK
    refused = [json.loads(line) for line in runs["tight_log"].read_text("utf-8").splitlines()]
    refusal = next(line for line in refused if line.get("outcome") == "reject")
    assert refusal["rule"] == "rate_limits/echo-limit"
    assert refusal["code"] == "RATE_LIMITED"
    assert refusal["correlation_id"]
    assert isinstance(refusal["ts"], float)


async def test_replay_command_reports_and_gates_on_the_changed_share(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tight, log = str(runs["tight"]), str(runs["loose_log"])
    out = io.StringIO()
    code = await asyncio.to_thread(
        main, ["replay", "--policies", tight, log, "--json", "--max-changed", "1%"], out=out
    )
    report = json.loads(out.getvalue())
    assert code == 1
    assert report["passed"] is False
    assert report["changed"] == len(runs["tight_refused"])
    assert report["by_kind"][ALLOWED_TO_REFUSED] == len(runs["tight_refused"])
    assert report["by_rule"][0]["rule"] == "rate_limits/echo-limit"
    assert len(report["examples"][ALLOWED_TO_REFUSED]) == 5

    out = io.StringIO()
    argv = ["replay", "--policies", tight, log, "--max-changed", "50%", "--progress", "always"]
    assert await asyncio.to_thread(main, argv, out=out) == 0
    text = out.getvalue()
    assert f"allowed -> refused: {len(runs['tight_refused'])}" in text
    assert "within --max-changed 50%" in text
    assert "replaying [" in capsys.readouterr().err

    out = io.StringIO()
    same = ["replay", "--policies", str(runs["loose"]), log, "--max-changed", "0"]
    assert await asyncio.to_thread(main, same, out=out) == 0
    assert "0 would change" in out.getvalue()


def test_replay_refuses_a_file_that_is_not_a_decision_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "p.yaml", tmp_path / "d.jsonl", **TIGHT)
    log = tmp_path / "not-a-log.jsonl"
    log.write_text('{"hook": "event"}\n', encoding="utf-8")
    assert main(["replay", "--policies", str(policy), str(log)], out=io.StringIO()) == 2
    assert "line 1: not a decision record" in capsys.readouterr().err
    assert main(["replay", "--policies", str(policy), str(log), "--max-changed", "x"]) == 2
