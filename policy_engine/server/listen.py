"""The listening socket of ``serve``, bound before anything slow happens.

A server that restarts (a crash, a deploy) refuses every connection until it listens, and
socket.io-client answers a refused connection by backing off for a second or more, twice
as long at each failure. Loading the server stack and compiling the policy take about a
second here, most of a restart, so ``serve`` binds its port first: connections made
meanwhile wait in the kernel's backlog and are answered as soon as the server runs, and
reconnecting clients lose no backoff round to the start-up. Importing this module costs
nothing beyond the standard library.
"""

from __future__ import annotations

import socket

BACKLOG = 2048
"""Connections the kernel holds for the server before it accepts them (uvicorn's default;
the kernel caps it at ``net.core.somaxconn``)."""


def bind_listener(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` (an IPv6 address when ``host`` has a
    colon); raises OSError when the address cannot be had.

    Made as asyncio makes its own, protocol ``IPPROTO_TCP`` named: asyncio sets
    ``TCP_NODELAY`` only on accepted sockets that say so, and without it small writes wait
    for the peer's delayed acknowledgement (40 ms a round trip on Linux).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
