"""Crafted payloads against a real server: no value switches a rule off, and a client over
its limit costs neither a schema validation nor a condition."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import socketio
from servers import WAIT

_addresses = itertools.count(1)

POLICY = """
version: 1
events:
  run: {schema: run.json}
authorization:
  rules:
    - name: no-destructive-commands
      hook: event
      when: event.name == "run" && event.payload.cmd.matches("(rm|sudo)")
      effect: deny
      code: DESTRUCTIVE
    - name: no-admin-tag
      hook: event
      when: event.name == "tag" && event.payload.tags.exists(t, t == "admin")
      effect: deny
      code: ADMIN_TAG
rate_limits:
  - name: one-per-user
    hook: event
    when: event.name == "keyed"
    key: string(event.payload.user)
    limit: 1/minute
  - name: runs-per-connection
    hook: event
    when: event.name == "run"
    key: conn.sid
    limit: 2/minute
"""
RUN_SCHEMA = {"type": "object", "required": ["cmd"], "properties": {"cmd": {"type": "string"}}}
BEYOND_64_BITS = 18446744073709551616  # 2**64


def app(sio: socketio.AsyncServer) -> None:
    for name in ("run", "tag", "keyed"):

        async def handler(sid: str, data: Any) -> Any:
            return {"ok": True}

        sio.on(name, handler)


def serve_policy(serve: Any, tmp_path: Path) -> Any:
    (tmp_path / "run.json").write_text(json.dumps(RUN_SCHEMA))
    return serve(POLICY, setup=app)


async def connect(clients: Any, served: Any) -> Any:
    headers = {"X-Forwarded-For": f"198.51.100.{next(_addresses) % 250 + 1}"}
    client, _ = await clients.connect(served.url, headers=headers)
    return client


async def answer(client: Any, event: str, data: Any) -> Any:
    return await client.call(event, data, timeout=WAIT)


async def test_an_integer_beyond_64_bits_elsewhere_does_not_switch_a_deny_rule_off(
    serve, clients, tmp_path
):
    client = await connect(clients, serve_policy(serve, tmp_path))

    plain = await answer(client, "run", {"cmd": "rm -rf /"})
    padded = await answer(client, "run", {"cmd": "rm -rf /", "pad": BEYOND_64_BITS})

    assert plain["code"] == padded["code"] == "DESTRUCTIVE"


async def test_a_lone_surrogate_elsewhere_does_not_switch_a_deny_rule_off(serve, clients, tmp_path):
    client = await connect(clients, serve_policy(serve, tmp_path))

    refused = await answer(client, "run", {"cmd": "sudo reboot", "note": "\ud800"})

    assert refused["code"] == "DESTRUCTIVE"


async def test_a_nul_byte_cannot_hide_the_rest_of_a_string_from_a_condition(
    serve, clients, tmp_path
):
    client = await connect(clients, serve_policy(serve, tmp_path))

    refused = await answer(client, "run", {"cmd": "ls\u0000; rm -rf /"})

    assert refused["code"] == "INVALID_PAYLOAD"
    assert refused["retryable"] is False
    assert "NUL" in refused["message"]


async def test_a_comprehension_rule_holds_whatever_else_the_payload_carries(
    serve, clients, tmp_path
):
    client = await connect(clients, serve_policy(serve, tmp_path))

    padded = await answer(client, "tag", {"tags": ["x", "admin"], "pad": BEYOND_64_BITS})
    inside = await answer(client, "tag", {"tags": ["admin", BEYOND_64_BITS]})
    surrogate = await answer(client, "tag", {"tags": ["\udfff", "admin"]})

    assert padded["code"] == "ADMIN_TAG"
    assert inside["code"] == surrogate["code"] == "INVALID_PAYLOAD"


async def test_a_payload_keyed_limit_applies_to_a_padded_payload(serve, clients, tmp_path):
    client = await connect(clients, serve_policy(serve, tmp_path))

    first = await answer(client, "keyed", {"user": "u1", "pad": BEYOND_64_BITS})
    second = await answer(client, "keyed", {"user": "u1", "pad": BEYOND_64_BITS})

    assert first == {"ok": True}
    assert second["code"] == "RATE_LIMITED"


async def test_a_payload_too_heavy_for_the_conditions_is_refused_with_its_own_code(
    serve, clients, tmp_path
):
    client = await connect(clients, serve_policy(serve, tmp_path))

    refused = await answer(client, "tag", {"tags": ["x"] * 5000})

    assert refused["code"] == "PAYLOAD_TOO_COMPLEX"
    assert refused["retryable"] is False


class Counting:
    """Counts the calls of a compiled validator or program, answering as it would."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.inner(*args)

    def evaluate(self, activation: Any) -> Any:
        self.calls += 1
        return self.inner.evaluate(activation)


async def test_a_client_over_its_limit_costs_no_validation_and_no_condition(
    serve, clients, tmp_path
):
    served = serve_policy(serve, tmp_path)
    policy = served.engine.policy
    spec = policy.events["run"]
    validations = Counting(spec.validate)
    object.__setattr__(spec, "validate", validations)
    (deny, _) = policy.authorization.rules
    conditions = Counting(deny.when.residual)
    object.__setattr__(deny.when, "residual", conditions)
    client = await connect(clients, served)

    answers = [await answer(client, "run", {"cmd": "ls"}) for _ in range(6)]

    assert [a.get("code") for a in answers] == [None, None] + ["RATE_LIMITED"] * 4
    assert (validations.calls, conditions.calls) == (2, 2)


HANDSHAKE_POLICY = """
version: 1
authorization:
  rules:
    - name: no-tools
      hook: connect
      when: has(conn.query.tool) && conn.query.tool.matches("(rm|sudo)")
      effect: deny
      code: NO_TOOLS
"""


async def test_a_nul_byte_in_the_handshake_cannot_hide_from_a_connect_rule(serve, clients):
    served = serve(HANDSHAKE_POLICY, setup=app)

    plain = await clients.refused(served.url, query={"tool": "sudo"})
    hidden = await clients.refused(served.url, query={"tool": "ls\u0000sudo"})

    assert plain["data"]["code"] == "NO_TOOLS"
    assert hidden["data"]["code"] == "INVALID_REQUEST"
    assert "NUL" in hidden["data"]["message"]
