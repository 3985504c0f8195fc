"""What a plain socket.io-client (no helper) does with each kind of connect refusal.

Each test starts a real server, runs tests/js/refusals.mjs under Node against it while it
refuses, changes the server's state so capacity returns, and asserts on what the client
printed: a refusal retrying can fix is retried by socket.io-client's own reconnection until
it connects; one it cannot fix stops the client at once (docs/clients.md lists which).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from servers import WAIT, Served, connect_limit, echo_app, eventually
from test_js_contract import JS_DIR, NODE, pytestmark  # noqa: F401 (the same skip)

RUN_LIMIT = 30.0


class Run:
    """One refusals.mjs run in the background; ``lines`` once it ended."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def lines(self) -> list[dict[str, Any]]:
        stdout, stderr = await asyncio.wait_for(self.process.communicate(), RUN_LIMIT)
        assert self.process.returncode == 0, (stdout, stderr)
        return [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]


async def start_client(url: str, transports: str, query: str = "") -> Run:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(JS_DIR / "refusals.mjs"),
        url,
        transports,
        query,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Run(process)


def of(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == event]


def refusals(served: Served, rule: str) -> int:
    decisions = served.observer.decisions
    return sum(1 for hook, d, _ in decisions if hook == "connect" and d.rule == rule)


async def refused_then_freed(
    served: Served, transports: str, rule: str, free: Callable[[], Any]
) -> list[dict[str, Any]]:
    """Run a plain client; once ``rule`` refused it twice (so it did retry), free capacity."""
    run = await start_client(served.url, transports)
    await eventually(lambda: refusals(served, rule) >= 2)
    await free()
    return await run.lines()


def assert_retried_then_connected(lines: list[dict[str, Any]]) -> None:
    assert lines[-1]["event"] == "connected", lines
    assert of(lines, "stopped") == []
    assert of(lines, "reconnect_attempt"), lines  # socket.io-client's own reconnection


TRANSPORTS = ["polling,websocket", "websocket"]

CEILING = """
version: 1
connections:
  max_total: 1
  retry_after: 300ms
"""


@pytest.mark.parametrize("transports", TRANSPORTS)
async def test_a_connection_ceiling_is_retried_until_a_slot_frees(serve, clients, transports):
    served = serve(CEILING)
    holder, _ = await clients.connect(served.url)

    lines = await refused_then_freed(served, transports, "connections/max_total", holder.disconnect)

    assert_retried_then_connected(lines)
    # The first refusal ends the session (over a WebSocket, after its advice); later ones
    # come from the gate, at the HTTP handshake. None is a namespace refusal.
    assert all(error["data"] is None for error in of(lines, "connect_error"))
    advice = of(lines, "advice")
    if transports == "websocket":
        assert advice
    for line in advice:
        assert line["payload"]["code"] == "TOO_MANY_CONNECTIONS"
        assert line["payload"]["retryable"] is True


OVERLOAD = """
version: 1
shedding:
  - name: overloaded
    hook: connect
    when: load.loop_lag_ms > 200
    action: reject
    retry_after: 300ms
"""


@pytest.mark.parametrize("transports", TRANSPORTS)
async def test_overload_is_refused_at_the_handshake_and_retried(serve, transports):
    served = serve(OVERLOAD)
    served.engine.load = {**served.engine.load, "loop_lag_ms": 500}

    async def calm() -> None:
        served.engine.load = {**served.engine.load, "loop_lag_ms": 0}

    lines = await refused_then_freed(served, transports, "shedding/overloaded", calm)

    assert_retried_then_connected(lines)
    # Refused at the HTTP handshake: a transport error, never a namespace refusal.
    errors = of(lines, "connect_error")
    assert errors
    assert all(error["data"] is None for error in errors)
    assert of(lines, "advice") == []


OVERLOAD_PER_CLIENT = """
version: 1
shedding:
  - name: overloaded-anonymous
    hook: connect
    when: load.loop_lag_ms > 200 && conn.user_id == ""
    action: reject
    retry_after: 300ms
"""


async def test_overload_judged_at_the_namespace_closes_the_session_and_is_retried(serve):
    served = serve(OVERLOAD_PER_CLIENT)
    served.engine.load = {**served.engine.load, "loop_lag_ms": 500}

    async def calm() -> None:
        served.engine.load = {**served.engine.load, "loop_lag_ms": 0}

    lines = await refused_then_freed(served, "websocket", "shedding/overloaded-anonymous", calm)

    assert_retried_then_connected(lines)
    assert of(lines, "advice")[0]["payload"]["code"] == "OVERLOADED"
    assert all(error["data"] is None for error in of(lines, "connect_error"))


@pytest.mark.parametrize("transports", TRANSPORTS)
async def test_a_connect_rate_limit_is_retried_until_it_admits(serve, clients, transports):
    served = serve(connect_limit("1/3s"), setup=echo_app)
    await clients.connect(served.url)  # takes the one token of the burst

    run = await start_client(served.url, transports)
    lines = await run.lines()

    assert_retried_then_connected(lines)
    assert all(error["data"] is None for error in of(lines, "connect_error"))
    for line in of(lines, "advice"):
        assert line["payload"]["code"] == "RATE_LIMITED"
        assert 0 < line["payload"]["retry_after_ms"] <= 3000


@pytest.mark.parametrize("transports", TRANSPORTS)
async def test_a_refusal_retrying_cannot_fix_stops_the_client_at_once(serve, transports):
    served = serve(setup=echo_app)  # the shipped policy requires a conversation_id

    run = await start_client(served.url, transports)
    lines = await run.lines()

    [stopped] = of(lines, "stopped")
    assert stopped["code"] == "CONVERSATION_REQUIRED"
    [error] = of(lines, "connect_error")
    assert error["data"]["retryable"] is False
    assert of(lines, "reconnect_attempt") == []
    assert of(lines, "connected") == []


QUEUED = """
version: 1
connections:
  max_total: 1
  retry_after: 300ms
  queue:
    max_wait: 20s
"""


async def test_under_an_admission_queue_a_plain_client_waits_and_connects_without_a_retry(
    serve, clients
):
    served = serve(QUEUED)
    holder, _ = await clients.connect(served.url)

    run = await start_client(served.url, "websocket")
    await eventually(lambda: served.adapter.admission.waiting == 1, WAIT)
    await holder.disconnect()
    lines = await run.lines()

    assert lines[-1]["event"] == "connected", lines
    assert of(lines, "reconnect_attempt") == []
    assert of(lines, "connect_error") == []
    assert of(lines, "advice") == []
