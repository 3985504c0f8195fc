"""The JavaScript client helper (clients/js/policy-client.mjs) against a real server.

Each test starts a server, runs one scenario of tests/js/contract.mjs under Node with
socket.io-client, and asserts on the JSON lines it prints. CI installs the client with
``npm ci --prefix tests/js``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from servers import CONTRACT_KEYS, EVENT_LIMIT, connect_limit, echo_app, eventually

from policy_engine.algorithms.backoff import schedule, to_client
from policy_engine.language.model import BackoffSpec, BackoffStrategy

JS_DIR = Path(__file__).resolve().parent / "js"
NODE = shutil.which("node")

_MISSING = (
    "node is not on PATH"
    if NODE is None
    else "socket.io-client is not installed: run `npm ci --prefix tests/js`"
    if not (JS_DIR / "node_modules" / "socket.io-client").is_dir()
    else ""
)
if _MISSING and os.environ.get("POLICY_ENGINE_REQUIRE_JS"):
    # CI sets this: there, a missing Node set-up must fail instead of hiding behind a skip.
    raise RuntimeError(f"the JavaScript contract tests cannot run: {_MISSING}")
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=_MISSING)


def run_scenario(scenario: str, url: str) -> list[dict[str, Any]]:
    """Run one scenario; returns its observations, in order."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(JS_DIR / "contract.mjs"), scenario, url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert lines[-1]["event"] == "done", lines
    return lines


def of(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == event]


def test_the_js_backoff_formulas_are_the_servers():
    randoms = [0.0, 0.25, 0.5, 0.75, 0.999]
    specs = [
        BackoffSpec(strategy.value, strategy, base=0.5, max=30.0, max_attempts=8, multiplier=m)
        for strategy in BackoffStrategy
        for m in (1.5, 2.0)
    ]
    specs.append(BackoffSpec("zero", BackoffStrategy.FULL_JITTER, base=0.0, max=1.0))
    specs.append(BackoffSpec("never", BackoffStrategy.EXPONENTIAL, max_attempts=0))
    cases = [{"backoff": to_client(spec), "randoms": randoms} for spec in specs]

    lines = run_scenario("formulas", json.dumps(cases))

    for spec, line in zip(specs, of(lines, "schedule"), strict=True):
        expected = [delay * 1000 for delay in schedule(spec, itertools.cycle(randoms).__next__)]
        assert line["delays"] == pytest.approx(expected), spec


def test_a_connect_refusal_reaches_the_js_client_with_the_whole_contract(serve):
    served = serve(setup=echo_app)  # the shipped policy requires a conversation_id

    lines = run_scenario("connect-refused", served.url)

    [error] = of(lines, "connect_error")
    payload = error["data"]
    assert set(payload) == CONTRACT_KEYS
    assert payload["code"] == "CONVERSATION_REQUIRED"
    assert payload["retryable"] is False
    assert error["message"] == payload["message"]
    [rejected] = of(lines, "rejected")
    assert rejected["name"] == "ConnectionRefused"
    assert rejected["payload"] == payload
    assert len(of(lines, "attempt")) == 1  # not retryable: never retried
    assert of(lines, "retry") == []


def test_an_event_refused_by_a_rate_limit_comes_back_as_the_ack_payload(serve):
    served = serve(EVENT_LIMIT, setup=echo_app)

    lines = run_scenario("event-refused", served.url)

    acks = {line["label"]: line["ack"] for line in of(lines, "ack")}
    assert acks["first"] == "first"
    refusal = acks["second"]
    assert set(refusal) == CONTRACT_KEYS
    assert refusal["code"] == "RATE_LIMITED"
    assert refusal["policy"] == "rate_limits/echo-per-connection"
    assert refusal["retryable"] is True
    assert refusal["retry_after_ms"] > 0
    assert set(refusal["backoff"]) == {
        "strategy",
        "base_ms",
        "max_ms",
        "max_attempts",
        "multiplier",
    }
    # The helper's own call was refused as well, waited the advice, and was answered.
    [retry] = of(lines, "retry")
    assert retry["delay_ms"] >= retry["payload"]["retry_after_ms"] > 10
    [answered] = [line for line in of(lines, "ack") if line["label"] == "third"]
    assert answered["ack"] == "third"
    assert answered["t"] - retry["t"] >= retry["payload"]["retry_after_ms"]


def test_a_rate_limited_connect_is_retried_only_after_retry_after_then_succeeds(serve):
    served = serve(connect_limit("1/1s"), setup=echo_app)

    lines = run_scenario("connect-retry", served.url)

    # Retrying can fix it: no connect_error, the session is closed after the advice.
    assert of(lines, "connect_error") == []
    [retry] = of(lines, "retry")
    payload = retry["payload"]
    assert set(payload) == CONTRACT_KEYS
    assert payload["code"] == "RATE_LIMITED"
    advised = payload["retry_after_ms"]
    assert advised > 10  # longer than the policy's 10 ms backoff: the advice decides
    assert retry["delay_ms"] == advised
    after = [line for line in lines if line["t"] > retry["t"]]
    next_attempt = of(after, "attempt")[0]
    next_handshake = of(after, "handshake")[0]
    assert next_attempt["t"] - retry["t"] >= advised
    assert next_handshake["t"] - retry["t"] >= advised
    assert len(of(lines, "attempt")) == 2
    assert of(lines, "connected")[-1]["t"] > next_handshake["t"]
    outcomes = [d.outcome.value for hook, d, _ in served.observer.decisions if hook == "connect"]
    assert outcomes == ["allow", "reject", "allow"]


def test_a_dropped_connection_is_retried_no_slower_than_by_a_plain_client(serve):
    served = serve(setup=echo_app)

    lines = run_scenario("reconnection", served.url)

    # As socket.io-client's own defaults (1 s doubling to 5 s, for ever), not the shipped
    # refusal advice (500 ms base, full jitter, 30 s cap, 10 attempts).
    [settings] = of(lines, "reconnection")
    assert settings["enabled"] is True
    assert settings["delay_ms"] == 1000
    assert settings["delay_max_ms"] == 5000
    assert settings["attempts"] == "unlimited"


async def test_a_refused_reconnection_waits_for_its_advice_not_the_plain_pace(serve):
    served = serve(connect_limit("1/2s"), setup=echo_app)
    assert NODE is not None
    node = await asyncio.create_subprocess_exec(
        NODE,
        str(JS_DIR / "contract.mjs"),
        "reconnect-refused",
        served.url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await eventually(lambda: served.adapter.active_connections() == 1)
    (state,) = served.adapter.connections().values()
    await served.run(served.adapter._end_transport(state.eio_sid))  # the server drops it
    stdout, stderr = await asyncio.wait_for(node.communicate(), 30)
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]

    assert lines[-1]["event"] == "done", (lines, stderr)
    # The reconnection came within the limit's 2 s: refused after its advice, and retried
    # after the advised wait (the plain pace would have tried again within 0.5-1.5 s).
    [retry] = of(lines, "retry")
    assert retry["payload"]["code"] == "RATE_LIMITED"
    assert retry["delay_ms"] >= retry["payload"]["retry_after_ms"] > 0
    after = [line for line in lines if line["t"] > retry["t"]]
    assert of(after, "handshake")[0]["t"] - retry["t"] >= retry["delay_ms"]
    assert len(of(lines, "connected")) == 2
