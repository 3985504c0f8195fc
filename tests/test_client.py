"""The python-socketio client helpers against a real policy-enforced server."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import socketio
from servers import CONTRACT_KEYS, EVENT_LIMIT, WAIT, connect_limit, echo_app, eventually

from policy_engine.client import (
    DEFAULT_BACKOFF,
    ConnectionRefused,
    EventRefused,
    RetryPlan,
    backoff_from,
    call_with_policy,
    connect_with_policy,
    contract_payload,
)


class RecordedSleep:
    """An injected ``sleep`` that records every requested delay, and waits it when ``real``."""

    def __init__(self, *, real: bool) -> None:
        self.real = real
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.real:
            await asyncio.sleep(seconds)


def connect_decisions(served: Any) -> list[Any]:
    return [decision for hook, decision, _ in served.observer.decisions if hook == "connect"]


# -- connect -----------------------------------------------------------------------------------


async def test_a_rate_limited_connect_is_retried_after_the_advised_wait_and_then_succeeds(
    serve, clients
):
    served = serve(connect_limit("1/1s"), setup=echo_app)
    await clients.connect(served.url)  # takes the only token of the burst
    client, inbox = clients.new()
    before = vars(client).get("_trigger_event")
    sleep = RecordedSleep(real=True)

    await connect_with_policy(
        client, served.url, sleep=sleep, transports=["websocket"], wait_timeout=WAIT
    )

    assert client.connected
    assert vars(client).get("_trigger_event") is before  # the client is left as it was
    assert await client.call("echo", "in", timeout=WAIT) == "in"
    [refusal] = inbox.errors  # the application's own connect_error handler still ran
    payload = refusal["data"]
    assert payload["code"] == "RATE_LIMITED"
    assert payload["policy"] == "rate_limits/connect-per-ip"
    assert payload["retryable"] is True
    assert payload["retry_after_ms"] > 10  # the advice outweighs the 10 ms backoff
    assert sleep.delays == [payload["retry_after_ms"] / 1000]
    outcomes = [d.outcome.value for d in connect_decisions(served)]
    assert outcomes == ["allow", "reject", "allow"]


async def test_a_refusal_that_is_not_retryable_raises_at_once_without_retrying(serve, clients):
    served = serve(setup=echo_app)  # the shipped policy requires a conversation_id
    client, _ = clients.new()
    sleep = RecordedSleep(real=False)

    with pytest.raises(ConnectionRefused) as refused:
        await connect_with_policy(
            client, served.url, sleep=sleep, transports=["websocket"], wait_timeout=WAIT
        )

    assert refused.value.code == "CONVERSATION_REQUIRED"
    assert refused.value.retryable is False
    assert set(refused.value.payload) == CONTRACT_KEYS
    assert sleep.delays == []
    assert len(connect_decisions(served)) == 1
    assert not client.connected


@pytest.mark.parametrize(("max_attempts", "retries"), [(None, 2), (1, 1)])
async def test_connect_gives_up_after_the_advised_number_of_attempts(
    serve, clients, max_attempts, retries
):
    served = serve(connect_limit("1/minute"), setup=echo_app)
    await clients.connect(served.url)
    client, _ = clients.new()
    sleep = RecordedSleep(real=False)  # a minute-long advice, not waited here

    with pytest.raises(ConnectionRefused) as refused:
        await connect_with_policy(
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
    assert len(connect_decisions(served)) == 1 + 1 + retries
    assert not client.connected


async def test_an_unreachable_server_is_retried_on_the_default_backoff_then_reported(clients):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and nothing listens on it once closed
    client, _ = clients.new()
    sleep = RecordedSleep(real=False)

    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect_with_policy(
            client,
            f"http://127.0.0.1:{port}",
            max_attempts=3,
            rand=lambda: 0.5,
            sleep=sleep,
            transports=["websocket"],
        )

    # Full jitter from 500 ms, doubling, with r = 0.5: half of 0.5 s, 1 s, 2 s.
    assert sleep.delays == [0.25, 0.5, 1.0]


# -- events ------------------------------------------------------------------------------------


async def test_a_rate_limited_call_is_retried_after_the_advised_wait_and_then_answered(
    serve, clients
):
    served = serve(EVENT_LIMIT, setup=echo_app)
    client, _ = await clients.connect(served.url)
    assert await client.call("echo", "first", timeout=WAIT) == "first"
    sleep = RecordedSleep(real=True)

    answer = await call_with_policy(client, "echo", "second", timeout=WAIT, sleep=sleep)

    assert answer == "second"
    refusals = [
        d.payload for hook, d, _ in served.observer.decisions if hook == "event" and not d.allowed
    ]
    assert len(refusals) == 1
    payload = refusals[0]
    assert payload is not None
    assert payload["code"] == "RATE_LIMITED"
    assert len(sleep.delays) == 1
    assert sleep.delays[0] >= payload["retry_after_ms"] / 1000 > 0.01


async def test_a_call_refused_for_good_raises_with_the_payload_and_no_wait(serve, clients):
    served = serve(setup=echo_app)
    client, _ = await clients.connect(served.url, query={"conversation_id": "c1"})
    sleep = RecordedSleep(real=False)

    with pytest.raises(EventRefused) as refused:
        await call_with_policy(client, "oh_user_action", {"args": {}}, timeout=WAIT, sleep=sleep)

    assert refused.value.code == "INVALID_PAYLOAD"
    assert set(refused.value.payload) == CONTRACT_KEYS
    assert sleep.delays == []


async def test_an_ordinary_ack_is_returned_as_it_is(serve, clients):
    served = serve(setup=echo_app)
    client, _ = await clients.connect(served.url, query={"conversation_id": "c1"})
    ack = {"code": "ok", "items": [1]}  # has a code, but no policy: not a refusal

    assert await call_with_policy(client, "echo", ack, timeout=WAIT) == ack


# -- the advice --------------------------------------------------------------------------------

ADVICE = {
    "strategy": "exponential",
    "base_ms": 200,
    "max_ms": 1000,
    "max_attempts": 4,
    "multiplier": 3.0,
}


def refusal(retry_after_ms: int | None, backoff: Any = ADVICE) -> dict[str, Any]:
    return {
        "code": "RATE_LIMITED",
        "policy": "rate_limits/x",
        "retryable": True,
        "retry_after_ms": retry_after_ms,
        "backoff": backoff,
    }


def test_each_wait_is_the_longer_of_retry_after_and_the_backoff_delay():
    plan = RetryPlan(rand=lambda: 0.0)

    waits = [plan.next_delay(refusal(ms)) for ms in (500, 100, None, 0, 5000)]

    # Backoff delays 0.2, 0.6, 1.8 capped at 1.0, 1.0; then the four retries are spent.
    assert waits == pytest.approx([0.5, 0.6, 1.0, 1.0, None])


def test_new_advice_applies_while_the_attempt_count_runs_on():
    plan = RetryPlan(rand=lambda: 0.5)

    unreachable = plan.next_delay(None)
    advised = plan.next_delay(refusal(None))

    assert unreachable == 0.25  # the default: full jitter from 500 ms
    assert advised == pytest.approx(0.6)  # exponential, second attempt: 200 ms * 3
    assert plan.backoff.base == 0.2


@pytest.mark.parametrize(
    "advice",
    [
        None,
        "full_jitter",
        {**ADVICE, "strategy": "linear"},
        {**ADVICE, "base_ms": -1},
        {**ADVICE, "max_attempts": True},
        {**ADVICE, "multiplier": 0.5},
        {**ADVICE, "max_ms": float("nan")},
    ],
)
def test_malformed_advice_is_ignored_for_the_last_good_one(advice):
    plan = RetryPlan(rand=lambda: 0.5)

    assert backoff_from(advice) is None
    assert plan.next_delay(refusal(None, advice)) == 0.25
    assert plan.backoff is DEFAULT_BACKOFF


def test_decorrelated_jitter_grows_from_the_previous_delay():
    advice = {**ADVICE, "strategy": "decorrelated_jitter", "max_ms": 60_000}
    plan = RetryPlan(rand=lambda: 1.0)

    waits = [plan.next_delay(refusal(None, advice)) for _ in range(3)]

    assert waits == pytest.approx([0.6, 1.8, 5.4])


def test_a_payload_is_found_in_connect_error_data_and_bare():
    payload = refusal(10)

    assert contract_payload({"message": "m", "data": payload}) == payload
    assert contract_payload(payload) == payload
    assert contract_payload({"message": "m", "data": None}) is None
    assert contract_payload("Connection error") is None


ONE_PER_IP = """
version: 1
defaults: {backoff: brief}
backoff:
  brief: {strategy: constant, base: 10ms, max: 10ms, max_attempts: 3}
connections:
  max_per_ip: 1
  retry_after: 20ms
"""


async def test_a_connection_ceiling_is_retried_and_passes_once_a_place_is_free(serve, clients):
    served = serve(ONE_PER_IP, setup=echo_app)
    first, _ = await clients.connect(served.url)
    client, inbox = clients.new()
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if first.connected:
            await first.disconnect()  # a place frees up while the client waits
            await eventually(lambda: served.engine.local.connection_counts()[0] == 0)
        await asyncio.sleep(seconds)

    await connect_with_policy(
        client, served.url, sleep=sleep, transports=["websocket"], wait_timeout=WAIT
    )

    assert client.connected
    [refusal] = inbox.errors
    payload = refusal["data"]
    assert payload["code"] == "TOO_MANY_CONNECTIONS"
    assert payload["retryable"] is True
    assert payload["retry_after_ms"] == 20
    assert payload["backoff"]["max_attempts"] == 3
    assert delays == [0.02]
