"""A hot reload under load loses no event and no connection, and a bad file changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import socketio
from servers import Clients

from policy_engine.server.reload import PolicyReloader

POLICY = """
version: 1
rate_limits:
  - {name: echo-per-connection, hook: event, when: 'event.name == "echo"', key: conn.sid,
     limit: 100000/second}
  - {name: other, hook: event, when: 'event.name == "other"', key: conn.sid, limit: LIMIT/minute}
"""
BROKEN = "version: 1\nrate_limits:\n  - {name: x, hook: event, key: conn.ipp, limit: 1/s}\n"

CLIENTS = 8
CALLS = 150


def register_echo(sio: socketio.AsyncServer) -> None:
    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        await asyncio.sleep(0)
        return data


async def test_reloads_under_load_lose_no_event(
    serve: Any, clients: Clients, tmp_path: Path
) -> None:
    served = serve(POLICY.replace("LIMIT", "9"), setup=register_echo)
    path = tmp_path / "policy.yaml"
    reloader = PolicyReloader(path, served.engine)
    connected = [(await clients.connect(served.url))[0] for _ in range(CLIENTS)]
    versions = {served.engine.policy.version}

    async def send(client: socketio.AsyncClient, index: int) -> list[Any]:
        return [await client.call("echo", [index, n], timeout=10) for n in range(CALLS)]

    async def reload_repeatedly() -> None:
        for round_ in range(30):
            broken = round_ % 5 == 4
            path.write_text(BROKEN if broken else POLICY.replace("LIMIT", str(10 + round_)))
            ok = await served.run(reloader.reload_async())
            assert ok is not broken
            versions.add(served.engine.policy.version)
            await asyncio.sleep(0.005)

    answers, _ = await asyncio.gather(
        asyncio.gather(*(send(c, i) for i, c in enumerate(connected))), reload_repeatedly()
    )
    for index, received in enumerate(answers):
        assert received == [[index, n] for n in range(CALLS)]
    assert all(client.connected for client in connected)
    assert (reloader.succeeded, reloader.failed) == (24, 6)
    assert len(versions) == 25
    # the last good policy is the one in force, not the broken file written after it
    assert served.engine.policy.rate_limits[1].rate.limit == 10 + 28
