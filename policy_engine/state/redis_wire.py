"""One connection to one Redis that carries every pipeline at once, replies read in order.

The store's hot path is a script call per decision, thousands per second. redis-py's
asyncio client spends more of a round trip in Python than Redis spends answering it: a
connection taken from and given back to its pool, a stream reader, a timeout task per
reply. Here, as in envoyproxy/ratelimit's Redis client, batches of commands are written to
one connection as they come, without waiting for the replies to the ones before; Redis
answers in order, so the n-th reply read belongs to the n-th command written. Replies are
parsed by hiredis as they arrive, in the protocol's callback: no task, no timer per call.

A batch has ``timeout`` seconds for its replies, as redis-py's ``socket_timeout`` has per
reply. Once the oldest unanswered command is older than that, the connection is dropped
and every command still waiting on it fails with :class:`~redis.exceptions.TimeoutError`:
they may have run, and a late reply can no longer be told from the next one. A lost
connection fails its waiting commands with :class:`~redis.exceptions.ConnectionError`;
the next batch connects again. Nothing is ever written twice.

Only a plain Redis reached over TCP or a Unix socket is spoken to this way (:func:`wire_for`
reads the address, credentials and database from the redis-py client the URL made); a
cluster, Sentinel or TLS keeps redis-py's connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    ResponseError,
    TimeoutError,
)

Waiting = collections.deque[tuple["asyncio.Future[Any]", float]]


class _ReplyError(Exception):
    """An error reply as hiredis hands it over, before redis-py's classes name it."""


class _Protocol(asyncio.Protocol):
    """The connection: futures for the replies still to come, oldest first."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=_ReplyError)
        self.waiting: Waiting = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.drop(ConnectionError("Redis sent a reply to no command"))
                return
            future = waiting.popleft()[0]
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, _ReplyError):
                future.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        lost = self.lost or ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        self.lost = lost
        waiting, self.waiting = self.waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(lost)

    def drop(self, error: BaseException) -> None:
        """Close at once and fail every command still waiting with ``error``."""
        if self.lost is None:
            self.lost = error
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows, on the next loop pass
        else:
            self.connection_lost(None)

    def send(self, packed: bytes, futures: Sequence[asyncio.Future[Any]], sent: float) -> None:
        assert self.transport is not None
        self.waiting.extend((future, sent) for future in futures)
        self.transport.write(packed)


class Wire:
    """Commands to one Redis, packed by the caller: see the module's docstring."""

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 0.5,
        connect_timeout: float | None = None,
    ) -> None:
        if (host is None) == (path is None):
            raise ValueError("a Redis is reached by host and port, or by a socket path")
        self.host, self.port, self.path = host, port, path
        self.timeout = timeout
        self.connect_timeout = connect_timeout or timeout
        self._hello = _hello(username, password, db)
        self._protocol: _Protocol | None = None
        self._queued: list[tuple[bytes, list[asyncio.Future[Any]]]] = []
        self._connecting: asyncio.Task[None] | None = None
        self._watching: asyncio.TimerHandle | None = None

    def send(self, packed: bytes, futures: list[asyncio.Future[Any]]) -> None:
        """Write packed commands, one future per command for its reply, in order."""
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.send(packed, futures, loop.time())
            self._watch(loop)
        else:
            self._queued.append((packed, futures))
            if self._connecting is None:
                self._connecting = loop.create_task(self._connect())

    async def _connect(self) -> None:
        """Connect, then write what was queued meanwhile; or fail it all."""
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    protocol = await self._open(loop)
            except asyncio.TimeoutError as exc:  # noqa: UP041 (3.11 keeps the two apart)
                raise TimeoutError("Timeout connecting to Redis") from exc
            except OSError as exc:
                raise ConnectionError(f"cannot connect to Redis: {exc}") from exc
        except BaseException as exc:
            queued, self._queued = self._queued, []
            for _, futures in queued:
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._protocol = protocol
            queued, self._queued = self._queued, []
            for packed, futures in queued:
                protocol.send(packed, futures, loop.time())
            self._watch(loop)
        finally:
            self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        if self.host is None:
            _, protocol = await loop.create_unix_connection(_Protocol, self.path)
        else:
            _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        if not self._hello:
            return protocol
        futures = [loop.create_future() for _ in self._hello]
        protocol.send(b"".join(pack(*words) for words in self._hello), futures, loop.time())
        try:
            for future in futures:
                await future
        except BaseException as exc:  # refused, or out of time: this connection is unused
            protocol.drop(ConnectionError("closed before it was used"))
            if isinstance(exc, ResponseError):
                raise AuthenticationError(str(exc)) from exc
            raise
        return protocol

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watching is None:
            self._watching = loop.call_at(loop.time() + self.timeout, self._check_late, loop)

    def _check_late(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop the connection once its oldest unanswered command is ``timeout`` old.

        One timer per connection, not one per batch: it runs while anything is waiting,
        and looks again when the oldest would be late. Replies that arrived meanwhile have
        been read first (the loop runs I/O callbacks before timers).
        """
        self._watching = None
        protocol = self._protocol
        if protocol is None:
            return
        waiting = protocol.waiting
        if not waiting:
            return
        oldest = waiting[0][1]
        now = loop.time()
        if now - oldest >= self.timeout:
            self._protocol = None
            protocol.drop(TimeoutError(f"Redis did not answer within {self.timeout} s"))
            return
        self._watching = loop.call_at(oldest + self.timeout, self._check_late, loop)

    async def aclose(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.drop(ConnectionError("the store was closed"))
            await asyncio.sleep(0)  # let connection_lost run


def _hello(username: str | None, password: str | None, db: int) -> list[tuple[bytes, ...]]:
    """The commands that open a connection: sign-in, then the database."""
    commands: list[tuple[bytes, ...]] = []
    if password is not None:
        words = [b"AUTH", password.encode()]
        if username:
            words.insert(1, username.encode())
        commands.append(tuple(words))
    if db:
        commands.append((b"SELECT", b"%d" % db))
    return commands


def pack(*words: bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        out.append(b"$%d\r\n%s\r\n" % (len(word), word))
    return b"".join(out)


def wire_for(client: Any, timeout: float) -> Wire | None:
    """A :class:`Wire` to the Redis a redis-py client reaches, when it is a plain one (TCP
    or Unix socket, no TLS, no Sentinel); None otherwise."""
    if type(client) is not Redis:
        return None
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    common: dict[str, Any] = {
        "username": kwargs.get("username"),
        "password": kwargs.get("password"),
        "db": int(kwargs.get("db") or 0),
        "timeout": kwargs.get("socket_timeout") or timeout,
        "connect_timeout": kwargs.get("socket_connect_timeout") or timeout,
    }
    if kwargs.get("credential_provider") is not None:
        return None
    if pool.connection_class is Connection:
        host, port = kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))
        return Wire(host=host, port=port, **common)
    if pool.connection_class is UnixDomainSocketConnection:
        return Wire(path=kwargs["path"], **common)
    return None
