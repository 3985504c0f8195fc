"""The overload gate: new handshakes refused at the HTTP layer, from the load alone."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
import socketio
from servers import CONTRACT_KEYS, WAIT

from policy_engine.adapter.gate import HandshakeGate
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import Engine

GATE_POLICY = """
version: 1
shedding:
  - name: overloaded
    hook: connect
    when: load.loop_lag_ms > 200
    action: reject
    retry_after: 5s
  - name: anonymous-first
    hook: connect
    when: load.active_connections > 100 && conn.user_id == ""
    action: reject
  - name: watch-cpu
    hook: connect
    when: load.cpu_percent > 90
    action: reject
    mode: shadow
  - name: memory
    hook: connect
    when: load.memory_mb > 1000
    action: reject
    sustained_for: 10s
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Inner:
    """The Socket.IO app behind the gate: records what reached it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)


def make_gate() -> tuple[HandshakeGate, Engine, Inner, Clock]:
    engine = Engine(compile_text(GATE_POLICY).policy)
    inner = Inner()
    clock = Clock()
    return HandshakeGate(inner, engine, clock=clock), engine, inner, clock


def http(path: str = "/socket.io/", query: bytes = b"EIO=4&transport=polling") -> dict[str, Any]:
    return {"type": "http", "path": path, "query_string": query, "headers": []}


async def call(gate: HandshakeGate, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gate(scope, receive, send)
    return sent


def overload(engine: Engine, **load: int) -> None:
    engine.load = {**engine.load, **load}


async def test_under_overload_a_new_handshake_gets_503_retry_after_and_the_payload():
    gate, engine, inner, _ = make_gate()
    overload(engine, loop_lag_ms=500)

    start, body = await call(gate, http())

    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"5"
    assert headers[b"content-type"] == b"application/json"
    payload = json.loads(body["body"])
    assert set(payload) == CONTRACT_KEYS
    assert payload["code"] == "OVERLOADED"
    assert payload["policy"] == "shedding/overloaded"
    assert payload["retry_after_ms"] == 5000
    assert payload["retryable"] is True
    assert inner.scopes == []


@pytest.mark.parametrize(
    "scope",
    [
        http(query=b"EIO=4&transport=polling&sid=abc"),  # an existing session
        http(query=b"sid=abc&EIO=4"),
        http(path="/api/health"),  # not Socket.IO
        {**http(query=b"EIO=4&transport=websocket&sid=abc"), "type": "websocket"},  # upgrade
    ],
)
async def test_existing_sessions_their_upgrades_and_other_paths_pass(scope):
    gate, engine, inner, _ = make_gate()
    overload(engine, loop_lag_ms=500)

    assert await call(gate, scope) == []
    assert inner.scopes == [scope]


async def test_a_parameter_merely_ending_in_sid_is_still_a_new_handshake():
    gate, engine, _, _ = make_gate()
    overload(engine, loop_lag_ms=500)

    start, _ = await call(gate, http(query=b"EIO=4&xsid=1"))

    assert start["status"] == 503


async def test_without_overload_everything_passes():
    gate, _, inner, _ = make_gate()

    assert await call(gate, http()) == []
    assert len(inner.scopes) == 1


async def test_rules_that_need_the_connection_or_are_in_shadow_mode_are_left_to_connect():
    gate, engine, inner, _ = make_gate()
    overload(engine, active_connections=500, cpu_percent=99)

    assert gate.judge() is None
    assert await call(gate, http()) == []
    assert len(inner.scopes) == 1


async def test_a_sustained_rule_refuses_only_once_its_condition_has_held_long_enough():
    gate, engine, _, clock = make_gate()
    overload(engine, memory_mb=2000)

    first = gate.judge()
    clock.now += 11
    later = gate.judge()
    overload(engine, memory_mb=10)
    calm = gate.judge()
    overload(engine, memory_mb=2000)
    again = gate.judge()

    assert first is None
    assert later is not None
    assert later.rule == "shedding/memory"
    assert calm is None
    assert again is None  # the clock restarts when the condition lapses


async def test_a_refused_polling_handshake_on_a_real_server(serve, clients):
    served = serve(GATE_POLICY)
    overload(served.engine, loop_lag_ms=500)

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{served.url}/socket.io/?EIO=4&transport=polling") as response,
    ):
        status, retry_after, payload = (
            response.status,
            response.headers["Retry-After"],
            await response.json(),
        )
    client, _ = clients.new()
    # python-engineio resets its HTTP session before reading a refused handshake's body, so
    # depending on timing its connect fails as ConnectionError or as aiohttp's RuntimeError.
    with pytest.raises((socketio.exceptions.ConnectionError, RuntimeError)):
        await client.connect(served.url, transports=["polling"], wait_timeout=WAIT)

    assert (status, retry_after) == (503, "5")
    assert payload["code"] == "OVERLOADED"
    assert served.observer.decisions[-1][0] == "connect"
    assert served.adapter.active_connections() == 0


async def ws_call(gate: HandshakeGate, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gate(scope, receive, send)
    return sent


def ws(extensions: dict[str, Any] | None) -> dict[str, Any]:
    scope = {**http(query=b"EIO=4&transport=websocket"), "type": "websocket"}
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


async def test_a_new_websocket_handshake_is_refused_with_an_http_response_where_offered():
    gate, engine, inner, _ = make_gate()
    overload(engine, loop_lag_ms=500)

    start, body = await ws_call(gate, ws({"websocket.http.response": {}}))
    (closed,) = await ws_call(gate, ws(None))

    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == b"5"
    assert json.loads(body["body"])["code"] == "OVERLOADED"
    assert closed == {"type": "websocket.close", "code": 1013}
    assert inner.scopes == []


async def test_a_websocket_only_client_is_refused_at_the_upgrade_on_a_real_server(serve, clients):
    served = serve(GATE_POLICY)
    overload(served.engine, loop_lag_ms=500)
    url = f"{served.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket"

    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
    overload(served.engine, loop_lag_ms=0)
    client, _ = await clients.connect(served.url, transports=("websocket",))

    assert refused.value.status == 503
    assert refused.value.headers is not None
    assert refused.value.headers["Retry-After"] == "5"
    assert client.connected


async def test_a_refusal_a_browser_on_an_allowed_origin_can_read(serve):
    served = serve(GATE_POLICY, cors_allowed_origins=["https://app.example"])
    overload(served.engine, loop_lag_ms=500)
    url = f"{served.url}/socket.io/?EIO=4&transport=polling"

    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Origin": "https://app.example"}) as allowed:
            allowed_headers = dict(allowed.headers)
        async with session.get(url, headers={"Origin": "https://evil.example"}) as other:
            other_headers = dict(other.headers)
        preflight_headers = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
        }
        async with session.options(url, headers=preflight_headers) as preflight:
            preflight_status = preflight.status
            preflight_origin = preflight.headers.get("Access-Control-Allow-Origin")

    assert allowed.status == other.status == 503
    assert allowed_headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert allowed_headers["Access-Control-Allow-Credentials"] == "true"
    assert "Access-Control-Allow-Origin" not in other_headers
    # A preflight is Engine.IO's to answer, overload or not.
    assert (preflight_status, preflight_origin) == (200, "https://app.example")


@pytest.mark.parametrize(
    "query", [b"EIO=4&transport=polling&sid=", b"EIO=4&sid=&transport=polling", b"sid&EIO=4"]
)
async def test_a_blank_sid_is_still_a_new_handshake(query):
    gate, engine, inner, _ = make_gate()
    overload(engine, loop_lag_ms=500)

    start, _ = await call(gate, http(query=query))

    assert start["status"] == 503
    assert inner.scopes == []


async def test_a_handshake_with_an_empty_sid_is_refused_on_a_real_server(serve):
    served = serve(GATE_POLICY)
    overload(served.engine, loop_lag_ms=500)

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{served.url}/socket.io/?EIO=4&transport=polling&sid=") as response,
    ):
        status, payload = response.status, await response.json()

    assert status == 503
    assert payload["code"] == "OVERLOADED"
    assert served.adapter.active_connections() == 0


FAILING_GATE_POLICY = """
version: 1
shedding:
  - name: per-connection-share
    hook: connect
    when: 1000 / load.active_connections < 10
    action: reject
    {override}
"""


@pytest.mark.parametrize(
    ("override", "refused"),
    [("", True), ("on_eval_error: fail_closed", True), ("on_eval_error: fail_open", False)],
)
async def test_a_load_rule_that_fails_to_evaluate_follows_its_on_eval_error(override, refused):
    policy = compile_text(FAILING_GATE_POLICY.format(override=override)).policy
    engine = Engine(policy)
    gate = HandshakeGate(Inner(), engine, clock=Clock())
    overload(engine, active_connections=0)  # 1000 / 0: the evaluation fails

    decision = gate.judge()

    assert (decision is not None) is refused
    if refused:
        assert decision is not None
        assert decision.rule == "shedding/per-connection-share"
