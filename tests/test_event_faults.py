"""Failures around an event handler that must not pass for success, through a real server."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import socketio
from servers import CONTRACT_KEYS

_addresses = itertools.count(1)


def fresh_ip() -> dict[str, str]:
    return {"X-Forwarded-For": f"192.0.2.{next(_addresses) % 250 + 1}"}


def agent_app(sio: socketio.AsyncServer) -> None:
    """An agent whose action is cancelled from within, as an inner timeout does."""

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        await sio.enter_room(sid, "c1")

    @sio.event
    async def oh_user_action(sid: str, data: Any) -> Any:
        async def stuck() -> None:
            await asyncio.sleep(10)

        async with asyncio.timeout(0.01):  # the agent runtime's own deadline
            await asyncio.shield(asyncio.ensure_future(stuck()))
        return {"ok": True}

    @sio.event
    async def cancelled(sid: str, data: Any) -> Any:
        raise asyncio.CancelledError


async def test_a_handler_cancelled_from_within_is_answered_and_counted_as_a_failure(serve, clients):
    served = serve(setup=agent_app)
    client, _ = await clients.connect(
        served.url, query={"conversation_id": "c1"}, headers=fresh_ip()
    )
    answer = await client.call("cancelled", {}, timeout=5)
    assert set(answer) >= CONTRACT_KEYS
    assert answer["code"] == "TIMEOUT"
    assert answer["retryable"] is True

    # Ten cancelled actions open the agent's breaker, as ten timeouts would.
    for _ in range(10):
        timed_out = await client.call("oh_user_action", {"action": "run"}, timeout=5)
        assert timed_out["code"] == "TIMEOUT"
    refused = await client.call("oh_user_action", {"action": "run"}, timeout=5)
    assert refused["code"] == "AGENT_UNAVAILABLE"


FAIL_CLOSED = """
version: 1
defaults:
  on_eval_error: fail_closed
"""


async def test_a_fault_of_the_policy_machinery_is_answered_as_the_policy_says(serve, clients):
    def echo_app(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def echo(sid: str, data: Any) -> Any:
            return data

    closed = serve(FAIL_CLOSED, setup=echo_app)
    opened = serve(setup=echo_app)
    closed_client, _ = await clients.connect(closed.url, headers=fresh_ip())
    opened_client, _ = await clients.connect(
        opened.url, query={"conversation_id": "c1"}, headers=fresh_ip()
    )

    def broken(*_: Any) -> None:
        raise RuntimeError("observer bug")

    for served in (closed, opened):
        served.observer.decision = broken  # type: ignore[method-assign]

    refused = await closed_client.call("echo", {"n": 1}, timeout=5)
    assert set(refused) >= CONTRACT_KEYS
    assert refused["code"] == "INTERNAL"
    assert "observer bug" not in str(refused)
    assert await opened_client.call("echo", {"n": 1}, timeout=5) == {"n": 1}
