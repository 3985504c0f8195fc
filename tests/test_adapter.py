"""The adapter against a real uvicorn server and real python-socketio clients."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any
from urllib.parse import parse_qs

import pytest
import socketio
from servers import CONTRACT_KEYS, SHIPPED_POLICY, WAIT, eventually

from policy_engine.adapter.attach import attach
from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.engine import Engine

_addresses = itertools.count(1)


def fresh_ip() -> dict[str, str]:
    """A client address of its own (the shipped policy trusts X-Forwarded-For from loopback)."""
    return {"X-Forwarded-For": f"203.0.113.{next(_addresses) % 250 + 1}"}


def conversation(conversation_id: str = "c1") -> dict[str, str]:
    return {"conversation_id": conversation_id}


def conversation_app(sio: socketio.AsyncServer) -> None:
    """A small conversation server, its handlers unaware of any policy."""

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        room = parse_qs(environ["QUERY_STRING"]).get("conversation_id", [""])[0]
        if room:
            await sio.enter_room(sid, room)

    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data

    @sio.event
    async def oh_user_action(sid: str, data: Any) -> Any:
        return {"ok": True}

    @sio.event
    async def boom(sid: str, data: Any) -> Any:
        raise RuntimeError("database password is hunter2")


# -- connect -----------------------------------------------------------------------------------


async def test_a_refused_connect_carries_the_whole_client_contract(serve, clients):
    served = serve(setup=conversation_app)

    error = await clients.refused(served.url, headers=fresh_ip())

    assert error["message"] == "Connect with a conversation_id."
    payload = error["data"]
    assert set(payload) == CONTRACT_KEYS
    assert payload["code"] == "CONVERSATION_REQUIRED"
    assert payload["category"] == "connection"
    assert payload["retryable"] is False
    assert payload["retry_after_ms"] is None
    assert payload["policy"] == "authorization/require-conversation"
    assert isinstance(payload["correlation_id"], str)
    assert payload["correlation_id"]
    assert served.adapter.active_connections() == 0


async def test_an_exception_in_the_connect_handler_becomes_a_classified_refusal(serve, clients):
    def app(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
            raise LookupError("conversation table is missing")

    served = serve(setup=app)

    error = await clients.refused(served.url, query=conversation(), headers=fresh_ip())

    payload = error["data"]
    assert payload["code"] == "INTERNAL"
    assert "table" not in payload["message"]
    assert error["message"] == payload["message"]
    hook, _, raw, reported = served.observer.errors[-1]
    assert (hook, raw["type"]) == ("connect", "LookupError")
    assert reported["correlation_id"] == payload["correlation_id"]
    assert served.adapter.active_connections() == 0
    assert served.engine.local.connection_counts() == (0, 0, 0)


async def test_a_fault_in_the_policy_machinery_still_ends_in_a_classified_refusal(serve, clients):
    served = serve(setup=conversation_app)

    async def broken(conn: Any, claims: Any, **_: Any) -> Any:
        raise ZeroDivisionError("engine bug")

    served.engine.on_connect = broken  # type: ignore[method-assign]

    error = await clients.refused(served.url, query=conversation(), headers=fresh_ip())

    assert error["data"]["code"] == "INTERNAL"
    assert served.observer.errors[-1][2]["type"] == "ZeroDivisionError"


async def test_a_legacy_connect_handler_runs_once_and_the_policy_judges_once(serve, clients):
    calls: list[str] = []

    def app(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def connect(sid: str, environ: dict[str, Any]) -> None:
            calls.append(sid)

    served = serve(setup=app)

    client, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    assert calls == [client.get_sid()]
    connects = [d for hook, d, _ in served.observer.decisions if hook == "connect"]
    assert len(connects) == 1
    assert served.adapter.active_connections() == 1


AUTH_POLICY = """
version: 1
errors:
  - name: refused
    when: error.type == "ConnectionRefusedError"
    category: connection
    severity: warning
    code: AUTH_FAILED
    message: Authentication failed.
    retryable: false
backoff:
  slow: {strategy: exponential, base: 1m, max: 10m}
connections:
  auth_failures: {threshold: 2, window: 1m, backoff: slow}
"""


async def test_app_refusals_are_classified_and_throttle_repeated_auth_failures(serve, clients):
    def app(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
            if (auth or {}).get("token") != "good":
                raise socketio.exceptions.ConnectionRefusedError("Bad token.")

    served = serve(AUTH_POLICY, setup=app)

    first = await clients.refused(served.url, auth={"token": "bad"})
    second = await clients.refused(served.url, auth={"token": "bad"})
    throttled = await clients.refused(served.url, auth={"token": "good"})

    assert first["message"] == "Bad token."
    assert [first["data"]["code"], second["data"]["code"]] == ["AUTH_FAILED", "AUTH_FAILED"]
    assert first["data"]["policy"] == "errors/refused"
    assert throttled["data"]["code"] == "AUTH_THROTTLED"
    assert throttled["data"]["retry_after_ms"] > 0

    clock = served.engine.clock
    served.engine.clock = lambda: clock() + throttled["data"]["retry_after_ms"] / 1000
    await clients.connect(served.url, auth={"token": "good"})
    # The success cleared the failures: the next bad attempt is judged afresh.
    again = await clients.refused(served.url, auth={"token": "bad"})
    assert again["data"]["code"] == "AUTH_FAILED"


async def test_a_failing_claims_loader_refuses_with_a_classified_payload(serve, clients):
    class AuthenticationError(Exception):
        pass

    def load(environ: Any, auth: Any) -> dict[str, Any]:
        raise AuthenticationError("expired")

    served = serve(setup=conversation_app, claims_loader=load)

    error = await clients.refused(served.url, query=conversation(), headers=fresh_ip())

    assert error["data"]["code"] == "AUTH_FAILED"
    assert served.adapter.active_connections() == 0


async def test_claims_from_an_async_loader_reach_authorization_rules(serve, clients):
    async def load(environ: Any, auth: Any) -> dict[str, Any]:
        return {"sub": "u-7", "banned": (auth or {}).get("who") == "mallory"}

    served = serve(setup=conversation_app, claims_loader=load)

    error = await clients.refused(
        served.url, query=conversation(), headers=fresh_ip(), auth={"who": "mallory"}
    )
    client, _ = await clients.connect(
        served.url, query=conversation(), headers=fresh_ip(), auth={"who": "alice"}
    )

    assert error["data"]["code"] == "FORBIDDEN"
    state = served.adapter.connections()[client.get_sid()]
    assert state.conn["user_id"] == "u-7"
    assert state.claims == {"sub": "u-7", "banned": False}


async def test_the_client_address_comes_from_the_scope_and_trusted_proxies(serve, clients):
    served = serve(setup=conversation_app)

    proxied, _ = await clients.connect(
        served.url, query=conversation(), headers={"X-Forwarded-For": "198.51.100.9"}
    )

    state = served.adapter.connections()[proxied.get_sid()]
    assert state.conn["ip"] == "198.51.100.9"  # loopback is a trusted proxy in this policy
    assert state.conn["query"]["conversation_id"] == "c1"
    assert state.conn["transport"] == "websocket"


# -- events ------------------------------------------------------------------------------------


async def test_the_51st_user_action_in_a_burst_is_rate_limited_in_its_ack(serve, clients):
    served = serve(setup=conversation_app)
    client, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    answers = await asyncio.gather(
        *(client.call("oh_user_action", {"action": "run"}, timeout=WAIT) for _ in range(60))
    )

    accepted = [a for a in answers if a == {"ok": True}]
    limited = [a for a in answers if a != {"ok": True}]
    assert 50 <= len(accepted) < 60
    assert all(a["code"] == "RATE_LIMITED" for a in limited)
    assert limited[0]["policy"] == "rate_limits/user-actions-per-connection"
    assert limited[0]["retry_after_ms"] > 0
    assert set(limited[0]) == CONTRACT_KEYS


async def test_a_payload_that_breaks_the_event_schema_is_refused(serve, clients):
    served = serve(setup=conversation_app)
    client, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    answer = await client.call("oh_user_action", {"args": {}}, timeout=WAIT)

    assert answer["code"] == "INVALID_PAYLOAD"
    assert answer["category"] == "client"
    assert answer["policy"] == "events/oh_user_action"


async def test_an_oversized_event_is_refused_by_its_measured_size(serve, clients):
    served = serve(setup=conversation_app)
    client, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    small = await client.call("echo", "é" * 100, timeout=WAIT)
    large = await client.call("echo", "é" * 40_000, timeout=WAIT)  # 80 KB of UTF-8 > 64KB

    assert small == "é" * 100
    assert large["code"] == "PAYLOAD_TOO_LARGE"


async def test_binary_attachments_count_towards_the_event_size(serve, clients):
    served = serve(setup=conversation_app)
    client, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    small = await client.call("echo", b"\x00" * 1024, timeout=WAIT)
    large = await client.call("echo", b"\x00" * 70_000, timeout=WAIT)
    after = await client.call("echo", "small again", timeout=WAIT)

    assert small == b"\x00" * 1024
    assert large["code"] == "PAYLOAD_TOO_LARGE"
    assert after == "small again"


SETTLING_POLICY = """\
version: 1
authorization:
  rules:
    - {name: settle-first, hook: event, when: "conn.connected_ms < 300", effect: deny,
       code: TOO_SOON}
"""


async def test_rules_see_the_connection_age_of_each_event(serve, clients):
    served = serve(SETTLING_POLICY, setup=conversation_app)
    client, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    early = await client.call("echo", 1, timeout=WAIT)
    await asyncio.sleep(0.4)
    later = await client.call("echo", 2, timeout=WAIT)

    assert early["code"] == "TOO_SOON"
    assert later == 2


async def test_a_handler_exception_is_answered_in_the_ack_and_others_keep_going(serve, clients):
    served = serve(setup=conversation_app)
    failing, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())
    other, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    failure, echoed = await asyncio.gather(
        failing.call("boom", {}, timeout=WAIT), other.call("echo", "still here", timeout=WAIT)
    )

    assert failure["code"] == "INTERNAL"
    assert failure["category"] == "system"
    assert failure["retryable"] is True
    assert "hunter2" not in str(failure)
    assert echoed == "still here"
    assert await failing.call("echo", 1, timeout=WAIT) == 1
    hook, _, raw, reported = served.observer.errors[-1]
    assert (hook, raw["type"]) == ("event", "RuntimeError")
    assert reported["correlation_id"] == failure["correlation_id"]


async def test_a_failure_without_an_ack_is_sent_as_the_error_event(serve, clients):
    served = serve(setup=conversation_app)
    client, inbox = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    await client.emit("boom", {})
    await client.emit("oh_user_action", {"no": "action"})

    await inbox.until(lambda: len(inbox.of("policy_error")) == 2)
    boom, invalid = inbox.of("policy_error")
    assert boom["code"] == "INTERNAL"
    assert invalid["code"] == "INVALID_PAYLOAD"


async def test_handlers_registered_after_attach_are_covered(serve, clients):
    def late(sio: socketio.AsyncServer) -> None:
        @sio.on("late_boom")
        async def late_boom(sid: str, data: Any) -> Any:
            raise PermissionError("no")

    served = serve(setup=conversation_app, setup_after=late)
    client, _ = await clients.connect(served.url, query=conversation(), headers=fresh_ip())

    answer = await client.call("late_boom", {}, timeout=WAIT)

    assert answer["code"] == "PERMISSION_DENIED"


class ChatNamespace(socketio.AsyncNamespace):
    """Class-based handlers in a custom namespace, with a legacy connect signature."""

    connects = 0

    async def on_connect(self, sid: str, environ: dict[str, Any]) -> None:
        ChatNamespace.connects += 1

    async def on_echo(self, sid: str, data: Any) -> Any:
        return data

    async def on_boom(self, sid: str, data: Any) -> Any:
        raise TimeoutError("agent runtime")


async def test_class_based_handlers_in_a_custom_namespace_are_covered(serve, clients):
    ChatNamespace.connects = 0
    served = serve(setup=lambda sio: sio.register_namespace(ChatNamespace("/chat")))

    refused = await clients.refused(served.url, headers=fresh_ip(), namespaces=["/chat"])
    client, _ = await clients.connect(
        served.url, query=conversation(), headers=fresh_ip(), namespaces=["/chat"]
    )
    echoed = await client.call("echo", "hi", namespace="/chat", timeout=WAIT)
    failure = await client.call("boom", {}, namespace="/chat", timeout=WAIT)

    assert refused["data"]["code"] == "CONVERSATION_REQUIRED"
    assert ChatNamespace.connects == 1
    assert echoed == "hi"
    assert failure["code"] == "TIMEOUT"
    assert failure["retry_after_ms"] == 1000
    state = served.adapter.connections()[client.get_sid("/chat")]
    assert state.namespace == "/chat"


BREAKER_POLICY = """
version: 1
circuit_breakers:
  - name: flaky
    match: event.name == "flaky"
    failure_rate: 50%
    window: {calls: 2}
    minimum_calls: 2
    open_for: 1m
    half_open_calls: 1
    code: FLAKY_DOWN
    fallback: {cached: true}
"""


async def test_an_open_breaker_answers_with_its_fallback_without_calling_the_handler(
    serve, clients
):
    calls: list[int] = []

    def app(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def flaky(sid: str, data: Any) -> Any:
            calls.append(data)
            raise ConnectionResetError("upstream")

    served = serve(BREAKER_POLICY, setup=app)
    client, _ = await clients.connect(served.url)

    failures = [await client.call("flaky", n, timeout=WAIT) for n in range(2)]
    refused = await client.call("flaky", 3, timeout=WAIT)

    assert calls == [0, 1]
    assert [f["code"] for f in failures] == ["INTERNAL", "INTERNAL"]
    assert refused == {"cached": True}  # the answer itself, as if the handler returned it
    assert [name for name, _ in served.observer.transitions] == ["flaky"]


SHEDDING_POLICY = """
version: 1
shedding:
  - name: drop-telemetry
    hook: event
    when: load.loop_lag_ms > 100 && event.name == "telemetry"
    action: drop
    max_priority: low
  - name: shed-viewers
    when: load.loop_lag_ms > 100
    action: disconnect
    max_priority: low
events:
  telemetry: {priority: low}
"""


async def test_dropped_events_answer_acks_but_send_no_error_event(serve, clients):
    seen: list[Any] = []

    def app(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def telemetry(sid: str, data: Any) -> Any:
            seen.append(data)
            return "stored"

    served = serve(SHEDDING_POLICY, setup=app)
    client, inbox = await clients.connect(served.url)
    served.engine.load = {**served.engine.load, "loop_lag_ms": 500}

    await client.emit("telemetry", 1)
    answer = await client.call("telemetry", 2, timeout=WAIT)

    assert answer["code"] == "OVERLOADED"
    assert answer["policy"] == "shedding/drop-telemetry"
    assert seen == []
    assert inbox.of("policy_error") == []


async def test_shed_tick_disconnects_the_chosen_connections_with_the_payload_first(serve, clients):
    served = serve(SHEDDING_POLICY)
    client, inbox = await clients.connect(served.url)
    sid = client.get_sid()
    served.engine.load = {**served.engine.load, "loop_lag_ms": 500}

    shed = await served.run(served.adapter.shed_tick())

    assert shed == 1
    await inbox.until(lambda: inbox.disconnects == 1)
    (payload,) = inbox.of("policy_error")
    assert payload["policy"] == "shedding/shed-viewers"
    assert served.observer.sheds == [("shedding/shed-viewers", "disconnect", 1)]
    await eventually(lambda: served.adapter.active_connections() == 0)
    assert ("shed", sid, "shedding/shed-viewers") in served.observer.connections


EMIT_POLICY = """
version: 1
rate_limits:
  - name: news-per-connection
    hook: emit
    when: event.name == "news"
    key: conn.sid
    limit: 2/minute
    burst: 2
"""


async def test_emit_hook_rules_drop_what_they_refuse(serve, clients):
    served = serve(EMIT_POLICY)
    client, inbox = await clients.connect(served.url)

    for n in range(5):
        await served.emit("news", {"n": n}, to=client.get_sid())
    await served.emit("oh_event", {"marker": True}, to=client.get_sid())

    await inbox.until(lambda: bool(inbox.of("oh_event")))
    assert inbox.of("news") == [{"n": 0}, {"n": 1}]
    assert [reason for _, _, reason in served.observer.drops] == [
        "rate_limits/news-per-connection"
    ] * 3


# -- disconnect and idle connections -----------------------------------------------------------


async def test_disconnects_release_every_piece_of_connection_state(serve, clients):
    served = serve(setup=conversation_app)
    opened = [
        (await clients.connect(served.url, query=conversation(), headers=fresh_ip()))[0]
        for _ in range(3)
    ]
    assert served.adapter.active_connections() == 3

    for client in opened:
        await client.call("echo", 1, timeout=WAIT)
        await client.disconnect()

    await eventually(lambda: served.adapter.active_connections() == 0)
    assert served.engine.local.connection_counts() == (0, 0, 0)
    assert served.adapter.outgoing.links == {}
    assert served.adapter._tasks == set()
    closed = [event for event, _, _ in served.observer.connections if event == "closed"]
    assert len(closed) == 3


IDLE_POLICY = """
version: 1
connections:
  idle_timeout: 500ms
"""


async def test_idle_connections_are_told_why_then_closed(serve, clients):
    served = serve(IDLE_POLICY)
    busy, busy_inbox = await clients.connect(served.url)
    idle, idle_inbox = await clients.connect(served.url)
    idle_sid = idle.get_sid()

    async def keep_busy() -> None:
        while not idle_inbox.disconnects:
            await busy.emit("anything")
            await asyncio.sleep(0.02)

    await asyncio.wait_for(keep_busy(), WAIT)

    (payload,) = idle_inbox.of("policy_error")
    assert payload["code"] == "IDLE_TIMEOUT"
    assert payload["policy"] == "connections/idle_timeout"
    assert busy.connected
    assert busy_inbox.of("policy_error") == []
    await eventually(lambda: served.adapter.active_connections() == 1)
    assert ("idle_closed", idle_sid, "idle_timeout") in served.observer.connections


def test_a_server_takes_one_policy_only():
    sio = socketio.AsyncServer(async_mode="asgi")
    engine = Engine(compile_file(SHIPPED_POLICY).policy)
    attach(sio, engine)

    with pytest.raises(RuntimeError, match="already attached"):
        attach(sio, engine)
