"""The helpers for python-socketio's synchronous ``socketio.Client``, against a real server.

Each test drives a real ``socketio.Client`` (its own reading threads, the ``websocket-client``
transport) from the test's thread against a uvicorn server on loopback, as in
tests/test_client.py for the asyncio helpers, and checks the same terms: the advised waits,
the give-up points, the payload raised.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import socketio
from servers import CONTRACT_KEYS, EVENT_LIMIT, WAIT, connect_limit, echo_app

from policy_engine import (
    ConnectionRefused,
    EventRefused,
    call_with_policy_sync,
    connect_with_policy_sync,
)


class RecordedSleep:
    """An injected ``sleep`` that records every requested delay, and waits it when ``real``."""

    def __init__(self, *, real: bool) -> None:
        self.real = real
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.real:
            time.sleep(seconds)


class SyncClients:
    """Real ``socketio.Client`` instances, each with the ``connect_error`` data it received."""

    def __init__(self) -> None:
        self.opened: list[socketio.Client] = []
        self.errors: dict[int, list[Any]] = {}

    def new(self) -> socketio.Client:
        client = socketio.Client(reconnection=False)
        errors = self.errors.setdefault(id(client), [])

        @client.on("connect_error")
        def connect_error(data: Any) -> None:
            errors.append(data)

        self.opened.append(client)
        return client

    def connect(self, url: str) -> socketio.Client:
        client = self.new()
        client.connect(url, transports=["websocket"], wait_timeout=WAIT)
        return client

    def close(self) -> None:
        for client in self.opened:
            if client.connected:
                client.disconnect()
            client.eio.disconnect()


@pytest.fixture
def sync_clients(serve: Any) -> Iterator[SyncClients]:
    """Closed before the servers ``serve`` started stop (fixtures end in reverse order)."""
    opened = SyncClients()
    yield opened
    opened.close()


def connect_outcomes(served: Any) -> list[str]:
    return [d.outcome.value for hook, d, _ in served.observer.decisions if hook == "connect"]


def test_a_rate_limited_connect_is_retried_after_the_advised_wait_and_then_succeeds(
    serve, sync_clients
):
    served = serve(connect_limit("1/1s"), setup=echo_app)
    sync_clients.connect(served.url)  # takes the only token of the burst
    client = sync_clients.new()
    before = vars(client).get("_trigger_event")
    sleep = RecordedSleep(real=True)

    connect_with_policy_sync(
        client, served.url, sleep=sleep, transports=["websocket"], wait_timeout=WAIT
    )

    assert client.connected
    assert vars(client).get("_trigger_event") is before  # the client is left as it was
    assert client.call("echo", "in", timeout=WAIT) == "in"
    assert sync_clients.errors[id(client)] == []  # retrying can fix it: no connect_error
    [refusal] = [d.payload for hook, d, _ in served.observer.decisions if not d.allowed]
    assert refusal is not None
    assert refusal["code"] == "RATE_LIMITED"
    assert refusal["retry_after_ms"] > 10  # the advice outweighs the policy's 10 ms backoff
    assert sleep.delays == [refusal["retry_after_ms"] / 1000]
    assert connect_outcomes(served) == ["allow", "reject", "allow"]


def test_a_refusal_that_is_not_retryable_raises_at_once_without_retrying(serve, sync_clients):
    served = serve(setup=echo_app)  # the shipped policy requires a conversation_id
    client = sync_clients.new()
    sleep = RecordedSleep(real=False)

    with pytest.raises(ConnectionRefused) as refused:
        connect_with_policy_sync(
            client, served.url, sleep=sleep, transports=["websocket"], wait_timeout=WAIT
        )

    assert refused.value.code == "CONVERSATION_REQUIRED"
    assert refused.value.retryable is False
    assert set(refused.value.payload) == CONTRACT_KEYS
    [error] = sync_clients.errors[id(client)]  # the application's handler still ran
    assert error["data"] == refused.value.payload
    assert sleep.delays == []
    assert connect_outcomes(served) == ["reject"]
    assert not client.connected


@pytest.mark.parametrize(("max_attempts", "retries"), [(None, 2), (1, 1)])
def test_connect_gives_up_after_the_advised_number_of_attempts(
    serve, sync_clients, max_attempts, retries
):
    served = serve(connect_limit("1/minute"), setup=echo_app)
    sync_clients.connect(served.url)
    client = sync_clients.new()
    sleep = RecordedSleep(real=False)  # a minute-long advice, not waited here

    with pytest.raises(ConnectionRefused) as refused:
        connect_with_policy_sync(
            client,
            served.url,
            max_attempts=max_attempts,
            sleep=sleep,
            transports=["websocket"],
            wait_timeout=WAIT,
        )

    assert refused.value.code == "RATE_LIMITED"
    assert len(sleep.delays) == retries
    assert all(delay >= 50.0 for delay in sleep.delays)
    assert len(connect_outcomes(served)) == 1 + 1 + retries
    assert not client.connected


def test_an_unreachable_server_is_retried_on_the_default_backoff_then_reported(sync_clients):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and nothing listens on it once closed
    client = sync_clients.new()
    sleep = RecordedSleep(real=False)

    with pytest.raises(socketio.exceptions.ConnectionError):
        connect_with_policy_sync(
            client,
            f"http://127.0.0.1:{port}",
            max_attempts=3,
            rand=lambda: 0.5,
            sleep=sleep,
            transports=["websocket"],
        )

    # Full jitter from 500 ms, doubling, with r = 0.5: half of 0.5 s, 1 s, 2 s.
    assert sleep.delays == [0.25, 0.5, 1.0]


def test_a_rate_limited_call_is_retried_after_the_advised_wait_and_then_answered(
    serve, sync_clients
):
    served = serve(EVENT_LIMIT, setup=echo_app)
    client = sync_clients.connect(served.url)
    assert client.call("echo", "first", timeout=WAIT) == "first"
    sleep = RecordedSleep(real=True)

    answer = call_with_policy_sync(client, "echo", "second", timeout=WAIT, sleep=sleep)

    assert answer == "second"
    [payload] = [
        d.payload for hook, d, _ in served.observer.decisions if hook == "event" and not d.allowed
    ]
    assert payload is not None
    assert payload["code"] == "RATE_LIMITED"
    assert len(sleep.delays) == 1
    assert sleep.delays[0] >= payload["retry_after_ms"] / 1000 > 0.01


def test_a_call_refused_for_good_raises_with_the_payload_and_no_wait(serve, sync_clients):
    served = serve(setup=echo_app)
    client = sync_clients.new()
    client.connect(f"{served.url}?conversation_id=c1", transports=["websocket"], wait_timeout=WAIT)
    sleep = RecordedSleep(real=False)

    with pytest.raises(EventRefused) as refused:
        call_with_policy_sync(client, "oh_user_action", {"args": {}}, timeout=WAIT, sleep=sleep)

    assert refused.value.code == "INVALID_PAYLOAD"
    assert set(refused.value.payload) == CONTRACT_KEYS
    assert sleep.delays == []


def test_an_ordinary_ack_is_returned_as_it_is(serve, sync_clients):
    served = serve(setup=echo_app)
    client = sync_clients.new()
    client.connect(f"{served.url}?conversation_id=c1", transports=["websocket"], wait_timeout=WAIT)
    ack = {"code": "ok", "items": [1]}  # has a code, but no policy: not a refusal

    assert call_with_policy_sync(client, "echo", ack, timeout=WAIT) == ack
