"""Emits that reach every process: python-socketio's Redis client manager beside the Redis store.

With ``--store redis://...`` the processes of a deployment share their limits, breakers and
replay buffers, but ``sio.emit`` in one process reaches the clients of another only when
the server's client manager publishes it. :func:`redis_manager` makes the
``socketio.AsyncRedisManager`` that ``serve`` gives the server it creates itself (the demo
app): the store's Redis, on a channel named after the store's key prefix and database.
Redis delivers a published message to every subscriber of the channel whatever database
they selected, so the database is part of the name: two deployments kept apart by database
number must not hear each other's emits.

A server the user made keeps the manager it was made with; :func:`warn_if_emits_stay_local`
says what to pass when that is python-socketio's in-process default.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import socketio
import structlog

from policy_engine.state.memory import StateStore

_log = structlog.get_logger("policy_engine")

CONNECT_TIMEOUT = 2.0
"""Seconds to connect to Redis, so an emit does not wait for the OS to give up on a host
that does not answer. No read timeout: the manager's subscriber waits idle between
messages, and with some redis-py versions a read timeout ends the subscription whenever
the channel is quiet that long."""


def redis_manager(store: StateStore | None) -> Any:
    """The client manager relaying emits through the store's Redis; None unless it is Redis.

    Every process of a deployment must use the same channel; a worker that only emits
    (``write_only=True``) must use it too: :func:`channel` names it.
    """
    if store is None:
        return None
    from policy_engine.state.redis_store import RedisStore  # noqa: PLC0415 (the redis extra)

    if not isinstance(store, RedisStore):
        return None
    from policy_engine.state.redis_clients import pubsub_url  # noqa: PLC0415 (the redis extra)

    url, _ = pubsub_url(store.url)
    return socketio.AsyncRedisManager(
        url,
        channel=channel(store.prefix, store.url),
        redis_options={"socket_connect_timeout": CONNECT_TIMEOUT},
    )


def channel(prefix: str, url: str) -> str:
    """The pub/sub channel of the deployment whose store keys start with ``prefix`` in the
    database ``url`` selects, e.g. ``policy-engine:socketio:0``."""
    from policy_engine.state.redis_clients import pubsub_url  # noqa: PLC0415 (the redis extra)

    return f"{prefix}:socketio:{pubsub_url(url)[1]}"


def emits_stay_local(sio: socketio.AsyncServer) -> bool:
    """Whether ``sio`` has python-socketio's in-process client manager, which hands an emit
    to this process's clients only."""
    return type(sio.manager) is socketio.AsyncManager


def warn_if_emits_stay_local(sio: socketio.AsyncServer, store: StateStore | None) -> bool:
    """Log a warning when the state is shared but the emits of ``sio`` are not; True if so.

    ``serve`` never replaces the manager of a server it did not create: the application may
    rely on it, and a manager is chosen when the server is made.
    """
    if store is None or not emits_stay_local(sio):
        return False
    url = _without_password(str(getattr(store, "url", "redis://...")))
    _log.warning(
        "server.emits_local",
        outcome="process_only",
        reason="the state store is shared, but this server's emits reach only the clients"
        " connected to this process",
        fix=f"create the server with client_manager=socketio.AsyncRedisManager({url!r}),"
        " or pass --no-redis-manager to share only the policy's state",
        audit=False,
    )
    return True


def describe(sio: socketio.AsyncServer) -> dict[str, Any]:
    """The client manager of ``sio`` and its pub/sub channel (None for one without), for
    ``/status``: whether this process's emits reach the clients of the others."""
    manager = sio.manager
    return {"manager": type(manager).__name__, "channel": getattr(manager, "channel", None)}


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
