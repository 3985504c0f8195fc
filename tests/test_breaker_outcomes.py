"""What a circuit breaker hears of a handler's outcome, through a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import socketio
from servers import SHIPPED_POLICY, WAIT

from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.engine import BreakerGuard, Engine, conn_context, event_context
from policy_engine.language.contexts import Hook

POLICY = """
version: 1
errors:
  - {name: bad-input, when: 'error.type == "ValueError"', category: client, code: BAD_INPUT}
circuit_breakers:
  - name: upstream
    match: event.name == "work"
    record_when: error.category == "system"
    failure_rate: 100%
    window: {calls: 2}
    minimum_calls: 2
    open_for: 1m
    code: UPSTREAM_DOWN
"""


def app(sio: socketio.AsyncServer) -> None:
    @sio.event
    async def work(sid: str, data: Any) -> Any:
        if data == "bad":
            raise ValueError("not a number")
        if data == "down":
            raise ConnectionError("upstream unreachable")
        return {"ok": True}


async def test_an_exception_outside_record_when_is_not_a_success(serve, clients):
    served = serve(POLICY, setup=app)
    client, _ = await clients.connect(served.url)

    answers = [await client.call("work", data, timeout=WAIT) for data in ("down", "bad", "down")]
    after = await client.call("work", "fine", timeout=WAIT)

    assert [a["code"] for a in answers] == ["INTERNAL", "BAD_INPUT", "INTERNAL"]
    # The client error between them neither failed nor succeeded: two failures in a row.
    assert after["code"] == "UPSTREAM_DOWN"
    assert [name for name, _ in served.observer.transitions] == ["upstream"]


async def test_a_cancelled_handler_is_classified_and_counted_as_a_failure() -> None:
    # What the adapter reports when a handler ends in CancelledError: under the shipped
    # policy it is a TIMEOUT, retryable, and the breaker guarding it counts a failure.
    engine = Engine(compile_file(SHIPPED_POLICY).policy, clock=lambda: 100.0)
    conn = conn_context(sid="s1", ip="192.0.2.1", user_id="u1", conversation_id="c1")
    event = event_context("oh_user_action", {"action": "run"})
    guard = await engine.before_call(conn, {}, event)
    assert isinstance(guard, BreakerGuard)

    classification, payload, error = engine.on_error(
        asyncio.CancelledError(), Hook.EVENT, conn, {}, event
    )
    await engine.after_call(guard, conn, event, classification, error)

    assert (payload["code"], payload["retryable"]) == ("TIMEOUT", True)
    assert engine.local.breaker_state("agent-runtime").window.failed == 1
