"""A ``serve`` process killed outright (SIGKILL: no shutdown, nothing given back), for real.

Two ``policy-engine serve`` processes share a Redis, with the demo app, a connection
ceiling per IP and connection-state recovery. A client on the process that dies comes back
on the other: the ceiling still counts its old connection until the dead process's lease
runs out (three seconds here, through the store URL's ``lease_ttl``), then lets it in, and
the client is replayed what was said in its conversation while it was away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from cluster import ServeProcess, stop_all
from redis.asyncio import Redis
from redis_server import RedisServer

WAIT = 10.0  # a bound on waiting for what normally takes milliseconds, not a timing check
LEASE_TTL = 3.0
CHANNEL = "policy-engine:socketio:0"

POLICY = """\
version: 1
defaults:
  store_timeout: 5s
  on_store_error: fail_closed
connections:
  max_per_ip: 2
  retry_after: 1s
recovery:
  enabled: true
  max_disconnection: 1m
  buffer_events: 100
  events: [oh_event]
"""


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICY, encoding="utf-8")
    store = f"{redis.url}?lease_ttl={LEASE_TTL}"
    pair = (
        ServeProcess("a", tmp_path, policies, store),
        ServeProcess("b", tmp_path, policies, store),
    )
    try:
        for process in pair:
            process.start()
        for process in pair:
            process.wait_until_ready()
        yield pair
    finally:
        stop_all(pair)
        redis.stop()


class Client:
    """A python-socketio client in conversation ``c`` that keeps what it is sent; its HTTP
    session is its own, closed by :meth:`close` even when the connect was refused."""

    def __init__(self) -> None:
        self.http = aiohttp.ClientSession()
        self.sio = socketio.AsyncClient(reconnection=False, http_session=self.http)
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sio.on("oh_event", self.events.put)

    async def connect(self, url: str, latest: int | None = None) -> None:
        query = "conversation_id=c" + ("" if latest is None else f"&latest_event_id={latest}")
        try:
            await self.sio.connect(f"{url}?{query}", transports=["websocket"], wait_timeout=WAIT)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()
        await self.http.close()

    async def next_event(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.events.get(), WAIT)


async def test_a_killed_process_stops_counting_within_its_lease_and_its_client_recovers_elsewhere(
    processes: tuple[ServeProcess, ServeProcess],
) -> None:
    a, b = processes
    victim, speaker = Client(), Client()
    await victim.connect(a.url)
    await speaker.connect(b.url)
    redis = Redis.from_url(a.store.partition("?")[0])
    try:
        while True:  # each process subscribes to the emits once its first client is in
            ((_, subscribers),) = await redis.pubsub_numsub(CHANNEL)
            if int(subscribers) >= 2:
                break
            await asyncio.sleep(0.02)
        await speaker.sio.call("oh_user_action", {"action": "one"}, timeout=WAIT)
        seen = await victim.next_event()
        assert seen["action"] == {"action": "one"}

        assert a.popen is not None
        a.popen.kill()  # SIGKILL: its connections are never given back
        a.popen.wait(WAIT)
        killed_at = time.monotonic()
        for action in ("two", "three"):
            await speaker.sio.call("oh_user_action", {"action": action}, timeout=WAIT)

        # The victim's connection still counts (2 of 2 for this IP) until the lease is out:
        # at least two thirds of it from now, the lease being renewed every third.
        comeback = Client()
        with pytest.raises(socketio.exceptions.ConnectionError):
            await comeback.connect(b.url, latest=seen["id"])

        while True:
            comeback = Client()
            try:
                await comeback.connect(b.url, latest=seen["id"])
                break
            except socketio.exceptions.ConnectionError:
                assert time.monotonic() - killed_at < LEASE_TTL + WAIT, "never let back in"
                await asyncio.sleep(0.2)
        missed = [await comeback.next_event(), await comeback.next_event()]
        await comeback.close()
    finally:
        await speaker.close()
        await victim.close()
        await redis.aclose()

    assert [(event["action"]["action"], event["id"]) for event in missed] == [
        ("two", seen["id"] + 1),
        ("three", seen["id"] + 2),
    ]
