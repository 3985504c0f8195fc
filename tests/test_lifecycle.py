"""Every connection's accounting is released exactly once, whatever ends it.

Driven through a real server: raw Engine.IO long-polling requests (aiohttp) where a
python-socketio client cannot produce the sequence (a session closed while the
application's connect handler still awaits), real clients otherwise.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp
import pytest
import socketio
from redis.asyncio import Redis
from servers import Served, eventually

from policy_engine.state.redis_store import RedisStore

ONE_PER_IP = """\
version: 1
connections:
  max_per_ip: 1
"""


def holding_app(held: list[str], release: threading.Event) -> Any:
    """An application whose connect handler awaits until released, for sids asking to."""

    def setup(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
            if "hold=1" in environ["QUERY_STRING"]:
                held.append(sid)
                while not release.is_set():
                    await asyncio.sleep(0.01)

    return setup


class Polling:
    """One Engine.IO session over raw long-polling requests."""

    def __init__(self, http: aiohttp.ClientSession, served: Served, query: str = "") -> None:
        self.http = http
        self.base = f"{served.url}/socket.io/?EIO=4&transport=polling{query}"
        self.sid = ""

    async def open(self) -> None:
        async with self.http.get(self.base) as response:
            text = await response.text()
        self.sid = json.loads(text[1:])["sid"]

    async def post(self, body: str) -> None:
        async with self.http.post(f"{self.base}&sid={self.sid}", data=body) as response:
            assert response.status == 200, await response.text()

    async def close_while_connecting(self, held: list[str]) -> asyncio.Future[None]:
        """Open, send the connect packet, and close once the connect handler awaits.

        Returns the connect packet's request: it is answered once the handler returns.
        """
        await self.open()
        connecting = len(held)
        connect = asyncio.ensure_future(self.post("40"))
        await eventually(lambda: len(held) > connecting)
        await self.post("1")  # Engine.IO close, while the handler still awaits
        return connect


async def test_a_session_closed_while_its_connect_handler_awaits_is_released(serve, clients):
    held: list[str] = []
    release = threading.Event()
    served = serve(ONE_PER_IP, setup=holding_app(held, release))
    try:
        async with aiohttp.ClientSession() as http:
            connects = []
            for attempt in range(1, 4):
                session = Polling(http, served, "&hold=1")
                connects.append(await session.close_while_connecting(held))
                assert len(held) == attempt
                await eventually(lambda: served.adapter.active_connections() == 0)
                assert served.engine.local.connection_counts() == (0, 0, 0)

            # A fresh client from the same address is not refused TOO_MANY_CONNECTIONS.
            client, _ = await clients.connect(served.url)
            assert served.engine.local.connection_counts() == (1, 0, 1)
            release.set()
            await asyncio.gather(*connects, return_exceptions=True)
    finally:
        release.set()
    # The handlers ended after their sessions: nothing of theirs is counted or kept.
    assert served.adapter.active_connections() == 1
    assert served.engine.local.connection_counts() == (1, 0, 1)
    assert list(served.sio.manager.rooms["/"][None]) == [client.get_sid()]


CONNECT_KEYED_PER_CONNECTION = """\
version: 1
connections:
  max_per_ip: 1
  retry_after: 1ms
rate_limits:
  - name: connects
    hook: connect
    key: 'conn.ip + "/" + conn.transport'
    limit: 1000/s
"""


async def test_refused_handshakes_leave_nothing_behind(serve, clients):
    served = serve(CONNECT_KEYED_PER_CONNECTION)
    client, _ = await clients.connect(served.url)

    for _ in range(20):
        error = await clients.refused(served.url)
        assert error["data"]["code"] == "TOO_MANY_CONNECTIONS"
        # Until the advised time has passed, the gate repeats the refusal at the HTTP
        # handshake (as documented) and the connect hook never sees the attempt. The time
        # runs from before the advice is sent: a client that waits it out on receipt is
        # judged by the connect hook each time.
        await asyncio.sleep(error["data"]["retry_after_ms"] / 1000)

    # The rate-limit key computed once per connection is kept for the connected one alone.
    assert list(served.engine._rates._connection_keys) == [client.get_sid()]
    assert served.engine.local.connection_counts() == (1, 0, 1)
    await client.disconnect()
    await eventually(lambda: not served.engine._rates._connection_keys)
    assert served.engine.local.connection_counts() == (0, 0, 0)


async def test_an_event_named_disconnect_releases_nothing_under_the_admin_ui(
    serve, clients, admin_ui
):
    served = serve(ONE_PER_IP, setup_after=admin_ui)
    client, _ = await clients.connect(served.url)

    await client.emit("disconnect", {"fake": True})
    await eventually(lambda: any(e[0] == "event" for e in served.observer.decisions))

    assert served.adapter.active_connections() == 1
    assert served.engine.local.connection_counts() == (1, 0, 1)
    error = await clients.refused(served.url)  # the ceiling still holds for the address
    assert error["data"]["code"] == "TOO_MANY_CONNECTIONS"
    await client.disconnect()
    await eventually(lambda: served.engine.local.connection_counts() == (0, 0, 0))


async def test_a_closed_session_under_the_admin_ui_is_released_while_connecting(serve, admin_ui):
    held: list[str] = []
    release = threading.Event()

    def setup(sio: socketio.AsyncServer) -> None:
        holding_app(held, release)(sio)
        admin_ui(sio)

    served = serve(ONE_PER_IP, setup_after=setup)
    try:
        async with aiohttp.ClientSession() as http:
            session = Polling(http, served, "&hold=1")
            connect = await session.close_while_connecting(held)
            await eventually(lambda: served.adapter.active_connections() == 0)
            assert served.engine.local.connection_counts() == (0, 0, 0)
            release.set()
            await asyncio.gather(connect, return_exceptions=True)
    finally:
        release.set()


async def test_stopping_the_server_releases_the_connections_it_still_tracks(serve, clients):
    served = serve(ONE_PER_IP)
    async with aiohttp.ClientSession() as http:
        session = Polling(http, served)
        await session.open()
        await session.post("40")
        await eventually(lambda: served.adapter.active_connections() == 1)
        assert served.engine.local.connection_counts() == (1, 0, 1)

        served.live.stop()  # the polling session never said goodbye

    assert served.adapter.active_connections() == 0
    assert served.engine.local.connection_counts() == (0, 0, 0)


async def test_on_redis_a_session_closed_while_connecting_leaves_no_count(
    serve, clients, own_redis_server
):
    held: list[str] = []
    release = threading.Event()
    store = RedisStore(own_redis_server.url, prefix="pending")
    served = serve(ONE_PER_IP, setup=holding_app(held, release), store=store)
    redis = Redis.from_url(own_redis_server.url)
    try:
        async with aiohttp.ClientSession() as http:
            session = Polling(http, served, "&hold=1")
            await session.open()
            connect = asyncio.ensure_future(session.post("40"))
            await eventually(lambda: len(held) == 1)
            assert await redis.get("{pending:conn}:total") == b"1"  # counted while connecting
            await session.post("1")
            await eventually(lambda: served.adapter.active_connections() == 0)
            # Nothing counted; the process's lease stays while it lives.
            assert await redis.keys("{pending:conn}:*") == [b"{pending:conn}:leases"]
            release.set()
            await asyncio.gather(connect, return_exceptions=True)
        await clients.connect(served.url)  # the address is not held at its ceiling
    finally:
        release.set()
        await redis.aclose()
        await served.run(store.close())


@pytest.mark.parametrize("always_connect", [False, True])
async def test_an_application_that_accepted_a_vanished_connect_hears_one_disconnect(
    serve, always_connect
):
    held: list[str] = []
    release = threading.Event()
    disconnects: list[str] = []

    def setup(sio: socketio.AsyncServer) -> None:
        holding_app(held, release)(sio)

        @sio.event
        async def disconnect(sid: str, reason: str) -> None:
            disconnects.append(sid)

    served = serve(ONE_PER_IP, setup=setup, always_connect=always_connect)
    try:
        async with aiohttp.ClientSession() as http:
            session = Polling(http, served, "&hold=1")
            connect = await session.close_while_connecting(held)
            await eventually(lambda: served.adapter.active_connections() == 0)
            release.set()
            await asyncio.gather(connect, return_exceptions=True)
    finally:
        release.set()
    await eventually(lambda: bool(disconnects))
    await asyncio.sleep(0.1)  # a second one would come at once
    assert disconnects == held
    assert served.sio.manager.rooms.get("/", {}).get(None, {}) == {}
