"""The mountings docs/api.md documents that differ from plain ASGI, served for real.

Plain ASGI (``adapter.asgi_app()`` under uvicorn) is how every adapter test serves. Two
documented mountings take another path to the adapter's start: aiohttp (no ASGI layer; the
application's startup hook starts it) and Django (its handler refuses the lifespan, so a
shim answers it in front). Each test checks a policy decision and that the adapter was
started: only its idle reaper closes an idle connection, told why.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from aiohttp import web
from servers import WAIT, LiveServer, policy_path

from policy_engine import Engine, attach, compile_file

POLICY = """
version: 1
connections:
  idle_timeout: 300ms
authorization:
  default: allow
  rules:
    - name: members-only
      hook: connect
      when: '!("member" in conn.query)'
      effect: deny
      code: FORBIDDEN
      message: Members only.
"""


def echo(sio: socketio.AsyncServer) -> None:
    @sio.event
    async def ping(sid: str, data: Any) -> Any:
        return data


async def told_idle_then_closed(url: str) -> dict[str, Any]:
    """Connect a member that then says nothing; returns the ``policy_error`` it was sent."""
    client = socketio.AsyncClient(reconnection=False)
    notices: list[Any] = []
    closed = asyncio.Event()
    client.on("policy_error", notices.append)
    client.on("disconnect", lambda *_: closed.set())
    try:
        await client.connect(f"{url}?member=1", transports=["websocket"], wait_timeout=WAIT)
        assert await client.call("ping", "pong", timeout=WAIT) == "pong"
        await asyncio.wait_for(closed.wait(), WAIT)
    finally:
        await client.disconnect()
    [notice] = notices
    return dict(notice)


async def refused(url: str) -> Any:
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", errors.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(url, transports=["websocket"], wait_timeout=WAIT)
    await client.disconnect()
    [error] = errors
    return error


@pytest.fixture
def policy(tmp_path: Path) -> Engine:
    return Engine(compile_file(policy_path(tmp_path, POLICY)).policy)


@pytest.fixture
async def aiohttp_url(policy: Engine) -> AsyncIterator[str]:
    """The aiohttp mounting of docs/api.md, on a free loopback port."""
    sio = socketio.AsyncServer(async_mode="aiohttp")
    echo(sio)
    adapter = attach(sio, policy)
    app = web.Application()
    sio.attach(app)

    async def start_policy(app: web.Application) -> None:
        await adapter.start()

    async def stop_policy(app: web.Application) -> None:
        await adapter.stop()

    app.on_startup.append(start_policy)
    app.on_cleanup.append(stop_policy)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, listener)
        await site.start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            await runner.cleanup()


async def test_the_aiohttp_mounting_decides_connects_and_starts_the_adapter(aiohttp_url):
    error = await refused(aiohttp_url)
    notice = await told_idle_then_closed(aiohttp_url)

    assert error["data"]["code"] == "FORBIDDEN"
    assert error["data"]["policy"] == "authorization/members-only"
    assert notice["code"] == "IDLE_TIMEOUT"


async def django_like(scope: Any, receive: Any, send: Any) -> None:
    """Refuses every scope but HTTP, as Django's ``ASGIHandler`` does."""
    if scope["type"] != "http":
        raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"django"})


async def django_with_lifespan(scope: Any, receive: Any, send: Any) -> None:
    """The shim of docs/api.md's Django section, as written there."""
    if scope["type"] != "lifespan":
        await django_like(scope, receive, send)
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def test_the_django_mounting_answers_the_lifespan_that_starts_the_adapter(policy):
    sio = socketio.AsyncServer(async_mode="asgi")
    echo(sio)
    live = LiveServer(attach(sio, policy).asgi_app(django_with_lifespan))
    live.start()
    try:
        error = await refused(live.url)
        notice = await told_idle_then_closed(live.url)
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
            writer.write(b"GET /admin/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            page = await reader.read()
            writer.close()
    finally:
        live.stop()

    assert error["data"]["code"] == "FORBIDDEN"
    assert notice["code"] == "IDLE_TIMEOUT"
    assert b"\r\ndjango\r\n" in page  # every other request reaches Django
