"""One client contract on every server: the shipped policy's refusals are the same payloads
on ``socketio.AsyncServer`` (uvicorn), ``socketio.Server`` (werkzeug, threads) and
Flask-SocketIO's server, for the same inputs.

Each test body runs once per server against real ``socketio.AsyncClient`` connections and
compares what the client receives with one expected payload (the correlation id, unique to
each refusal, is only checked for presence).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from flask import request
from flask_socketio import SocketIO
from servers import CONTRACT_KEYS, WAIT, policy_path
from sync_servers import SyncServed, start_sync_server

from policy_engine.cli.token import mint

SERVERS = ("async", "sync", "flask")
_addresses = itertools.count(1)

DEFAULT = {
    "strategy": "full_jitter",
    "base_ms": 500,
    "max_ms": 30000,
    "max_attempts": 10,
    "multiplier": 2.0,
}


def fresh_ip() -> dict[str, str]:
    return {"X-Forwarded-For": f"192.0.2.{next(_addresses) % 250 + 1}"}


def conversation(**extra: str) -> dict[str, str]:
    return {"conversation_id": "c1", **extra}


class ConversationNotFound(Exception):  # noqa: N818 (the name the policy matches)
    """The application's own error, which the shipped policy classifies by name."""


def connect_handler(sid: str, environ: dict[str, Any], auth: Any) -> None:
    query = environ.get("QUERY_STRING", "")
    if "refuse=1" in query:
        raise socketio.exceptions.ConnectionRefusedError("Not in this room.")
    if "missing=1" in query:
        raise ConversationNotFound("no row 42 in conversations")


def boom(sid: str, data: Any) -> Any:
    raise RuntimeError("database password is hunter2")


def forbidden(sid: str, data: Any) -> Any:
    raise PermissionError("not yours")


def echo(sid: str, data: Any) -> Any:
    return data


def oh_user_action(sid: str, data: Any) -> Any:
    return {"ok": True}


HANDLERS: dict[str, Callable[..., Any]] = {
    "connect": connect_handler,
    "boom": boom,
    "forbidden": forbidden,
    "echo": echo,
    "oh_user_action": oh_user_action,
}


def async_app(sio: socketio.AsyncServer) -> None:
    for name, handler in HANDLERS.items():

        async def on_async(*args: Any, _handler: Callable[..., Any] = handler) -> Any:
            return _handler(*args)

        sio.on(name, on_async)


def sync_app(sio: socketio.Server) -> None:
    for name, handler in HANDLERS.items():
        sio.on(name, handler)


def flask_app(ext: SocketIO) -> None:
    for name, handler in HANDLERS.items():
        if name == "connect":

            @ext.on("connect")
            def on_connect(auth: Any) -> None:
                connect_handler(request.sid, request.environ, auth)  # type: ignore[attr-defined]

        else:

            def on_event(data: Any, _handler: Callable[..., Any] = handler) -> Any:
                return _handler(request.sid, data)  # type: ignore[attr-defined]

            ext.on(name)(on_event)


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, serve: Any, tmp_path: Path) -> Iterator[Any]:
    """The shipped policy on one kind of server, started for real; its ``url``."""
    started: list[SyncServed] = []
    policy = policy_path(tmp_path, None)
    if request.param == "async":
        yield serve(setup=async_app)
    elif request.param == "sync":
        started.append(start_sync_server(policy, setup=sync_app))
        yield started[-1]
    else:
        started.append(start_sync_server(policy, flask_setup=flask_app))
        yield started[-1]
    for served in started:
        served.stop()


def without_id(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload but its correlation id, which must be there and is unique to it."""
    assert set(payload) >= CONTRACT_KEYS
    rest = dict(payload)
    assert isinstance(rest.pop("correlation_id"), str)
    return rest


def refusal(
    code: str,
    category: str,
    message: str,
    policy: str,
    *,
    retryable: bool = False,
    backoff: dict[str, Any] | None = None,
    retry_after_ms: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "code": code,
        "category": category,
        "message": message,
        "retryable": retryable,
        "retry_after_ms": retry_after_ms,
        "backoff": backoff,
        "policy": policy,
        **extra,
    }


# -- connect -----------------------------------------------------------------------------------


async def test_a_connect_without_a_conversation(server, clients):
    error = await clients.refused(server.url, headers=fresh_ip())

    assert error["message"] == "Connect with a conversation_id."
    assert without_id(error["data"]) == refusal(
        "CONVERSATION_REQUIRED",
        "connection",
        "Connect with a conversation_id.",
        "authorization/require-conversation",
    )


async def test_a_conversation_named_twice(server, clients):
    error = await clients.refused(
        f"{server.url}/?conversation_id=a&conversation_id=b", headers=fresh_ip()
    )

    payload = without_id(error["data"])
    assert (payload["code"], payload["policy"]) == ("INVALID_REQUEST", "identity")
    assert payload == await _same_on_every_server("identity-twice", payload)


async def test_a_token_that_does_not_verify(server, clients):
    error = await clients.refused(
        server.url, query=conversation(), auth={"token": "not-a-jwt"}, headers=fresh_ip()
    )

    assert without_id(error["data"]) == refusal(
        "AUTH_FAILED",
        "connection",
        "Authentication failed; sign in again.",
        "errors/auth-failed",
    )


async def test_a_banned_account(server, clients):
    token = mint("mallory", {"banned": True})
    error = await clients.refused(
        server.url, query=conversation(), auth={"token": token}, headers=fresh_ip()
    )

    assert without_id(error["data"]) == refusal(
        "FORBIDDEN", "connection", "This account may not connect.", "authorization/banned-users"
    )


async def test_a_refusal_of_the_application_keeps_its_message(server, clients):
    error = await clients.refused(server.url, query=conversation(refuse="1"), headers=fresh_ip())

    payload = without_id(error["data"])
    assert payload["message"] == "Not in this room."
    assert payload == await _same_on_every_server("app-refusal", payload)


async def test_an_application_error_at_connect_is_classified(server, clients):
    error = await clients.refused(server.url, query=conversation(missing="1"), headers=fresh_ip())

    assert without_id(error["data"]) == refusal(
        "CONVERSATION_NOT_FOUND",
        "connection",
        "This conversation does not exist.",
        "errors/conversation-not-found",
    )


async def test_a_connect_over_the_per_user_ceiling_is_advised_to_retry(server, clients):
    token = mint("dave")
    for _ in range(5):
        await clients.connect(
            server.url, query=conversation(), auth={"token": token}, headers=fresh_ip()
        )

    error = await clients.refused(
        server.url, query=conversation(), auth={"token": token}, headers=fresh_ip()
    )

    payload = without_id(error["data"])
    assert payload == refusal(
        "TOO_MANY_CONNECTIONS",
        "connection",
        "Connection limit reached (max per user).",
        "connections/max_per_user",
        retryable=True,
        backoff={**DEFAULT, "max_ms": 20000},  # sized to twice the retry advice
        retry_after_ms=10000,
    )


async def test_the_sixth_connect_from_one_address_is_rate_limited(server, clients):
    address = fresh_ip()
    for _ in range(5):
        await clients.connect(server.url, query=conversation(), headers=address)

    error = await clients.refused(server.url, query=conversation(), headers=address)

    payload = without_id(error["data"])
    retry = payload["retry_after_ms"]
    assert retry > 0
    sized = {**DEFAULT, "max_ms": min(30000, max(500, 2 * retry))}  # twice the advice
    assert {**payload, "retry_after_ms": None} == refusal(
        "RATE_LIMITED",
        "client",
        payload["message"],
        "rate_limits/connect-per-ip",
        retryable=True,
        backoff=sized,
    )


# -- events ------------------------------------------------------------------------------------


async def test_a_payload_that_breaks_its_schema(server, clients):
    client, _ = await clients.connect(server.url, query=conversation(), headers=fresh_ip())

    answer = await client.call("oh_user_action", {"args": {}}, timeout=WAIT)

    assert without_id(answer) == refusal(
        "INVALID_PAYLOAD",
        "client",
        "Invalid payload: data must contain ['action'] properties",
        "events/oh_user_action",
    )


async def test_an_action_of_a_viewer(server, clients):
    token = mint("erin", {"role": "viewer"})
    client, _ = await clients.connect(
        server.url, query=conversation(), auth={"token": token}, headers=fresh_ip()
    )

    answer = await client.call("oh_user_action", {"action": "run"}, timeout=WAIT)

    assert without_id(answer) == refusal(
        "READ_ONLY", "client", "Viewers cannot send actions.",
        "authorization/read-only-viewers",
    )  # fmt: skip


async def test_an_event_over_its_size(server, clients):
    client, _ = await clients.connect(server.url, query=conversation(), headers=fresh_ip())

    answer = await client.call("echo", "x" * 70_000, timeout=WAIT)

    payload = without_id(answer)
    assert (payload["code"], payload["policy"]) == ("PAYLOAD_TOO_LARGE", "events/*")
    assert payload == await _same_on_every_server("too-large", payload)


async def test_an_event_nested_too_deep(server, clients):
    client, _ = await clients.connect(server.url, query=conversation(), headers=fresh_ip())
    deep: Any = 1
    for _ in range(40):
        deep = [deep]

    answer = await client.call("echo", deep, timeout=WAIT)

    payload = without_id(answer)
    assert (payload["code"], payload["policy"]) == ("INVALID_REQUEST", "connections/protocol")
    assert payload == await _same_on_every_server("too-deep", payload)


async def test_an_event_under_a_reserved_name(server, clients):
    client, _ = await clients.connect(server.url, query=conversation(), headers=fresh_ip())

    answer = await client.call("disconnecting", {}, timeout=WAIT)

    payload = without_id(answer)
    assert (payload["code"], payload["policy"]) == ("INVALID_REQUEST", "connections/protocol")
    assert payload == await _same_on_every_server("reserved", payload)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            "boom",
            refusal(
                "INTERNAL", "system", "An internal error occurred; retry later.",
                "errors/internal", retryable=True, backoff=DEFAULT,
            ),
        ),
        (
            "forbidden",
            refusal(
                "PERMISSION_DENIED", "event_processing", "You are not allowed to do that.",
                "errors/permission-denied",
            ),
        ),
    ],
)  # fmt: skip
async def test_a_handler_failure_in_the_ack_and_as_the_error_event(
    server, clients, event, expected
):
    client, inbox = await clients.connect(server.url, query=conversation(), headers=fresh_ip())

    answer = await client.call(event, {}, timeout=WAIT)
    await client.emit(event, {})
    await inbox.until(lambda: bool(inbox.of("policy_error")))

    assert without_id(answer) == expected
    assert without_id(inbox.of("policy_error")[0]) == expected


async def test_a_burst_of_user_actions_over_fifty_a_second(server, clients):
    """120 at once against a burst of 50 refilled at 50/s: some are refused unless the
    server took over a second and a half to judge them."""
    client, _ = await clients.connect(server.url, query=conversation(), headers=fresh_ip())

    answers = await asyncio.gather(
        *(client.call("oh_user_action", {"action": "run"}, timeout=WAIT) for _ in range(120))
    )

    limited = [without_id(a) for a in answers if a != {"ok": True}]
    assert limited
    assert all(a["retry_after_ms"] > 0 for a in limited)
    assert {**limited[0], "retry_after_ms": None} == refusal(
        "RATE_LIMITED", "client", "You are sending actions too fast; slow down.",
        "rate_limits/user-actions-per-connection", retryable=True, backoff=DEFAULT,
    )  # fmt: skip


# What a test saw first, by scenario: the other servers must answer the same.
_SEEN: dict[str, dict[str, Any]] = {}


async def _same_on_every_server(scenario: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload the first server of this run gave for ``scenario`` (servers run in
    order, the async one first): for refusals whose text is the engine's, not this file's."""
    return _SEEN.setdefault(scenario, payload)
