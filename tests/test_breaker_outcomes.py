"""What a circuit breaker hears of a handler's outcome, through a real server."""

from __future__ import annotations

from typing import Any

import socketio
from servers import WAIT

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
