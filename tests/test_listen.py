"""The listening socket ``serve`` binds before it loads (policy_engine.server.listen)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from policy_engine.server.listen import bind_listener


async def test_connections_accepted_from_it_send_small_writes_at_once() -> None:
    """asyncio sets TCP_NODELAY only on accepted TCP sockets whose protocol is named:
    without it every small write of a round trip waits for a delayed acknowledgement."""
    listener = bind_listener("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connected(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(connected, sock=listener)
    try:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        nodelay = await asyncio.wait_for(accepted, 10)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert nodelay != 0


def test_a_taken_address_raises() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(OSError, match="in use"):
        bind_listener("127.0.0.1", taken.getsockname()[1])
