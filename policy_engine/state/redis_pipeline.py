"""Implicit pipelining: script calls made at about the same time go to Redis as one batch.

Each decision on the Redis store is one Lua script. Under load many decisions are in
flight at once, and sending each on its own costs a round trip (and a connection from the
pool) per decision. :class:`Pipeline` queues the calls made within ``window`` seconds (0:
the calls made before the event loop next runs its callbacks) and sends them as one
pipeline of ``EVALSHA`` commands, at most ``limit`` per batch, the way
envoyproxy/ratelimit's ``REDIS_PIPELINE_WINDOW`` and ``REDIS_PIPELINE_LIMIT`` do. Every
script stays atomic on its own; a batch is not a transaction, and no call waits for
another's result.

A script Redis does not know (a restarted server, a flushed script cache) is loaded and
the calls that met ``NOSCRIPT`` are sent again, once. A caller that gives up (its
``store_timeout``) only stops waiting: its call may still run in Redis.

On a Redis Cluster a batch is split by the node that holds each call's keys (a call's keys
share one slot: see :mod:`policy_engine.state.redis_scripts`), and each node gets its part
as one pipeline, all nodes at once: still one round trip per batch per node. A node that
fails fails only the calls sent to it. redis-py follows ``MOVED`` and ``ASK`` for the
calls they answer; after a failure that says the cluster changed (a node unreachable, a
slot not served) the map of slots to nodes is read again, so that calls go to the nodes
that took over once the cluster has.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)

from policy_engine.state.redis_clients import RedisClient
from policy_engine.state.redis_wire import Wire, pack

Arg = str | bytes | int | float


class Words:
    """Script arguments encoded once, as the wire carries them: a rule's own, the same on
    every call (packing them again for each call was a tenth of a shared decision's cost)."""

    __slots__ = ("count", "encoded", "values")

    def __init__(self, values: Sequence[Arg]) -> None:
        self.values = tuple(values)
        self.count = len(self.values)
        self.encoded = b"".join(_bulk(value) for value in self.values)

    def __repr__(self) -> str:
        return f"Words{self.values!r}"


@dataclass(frozen=True, slots=True)
class Call:
    """One script run: the script (registered on the client) with its keys and arguments.

    On a Redis Cluster the keys must share one slot, and there must be one at least.
    """

    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Arg | Words]

    @property
    def plain_count(self) -> int:
        """How many arguments the script receives (``#ARGV``)."""
        return sum(value.count if type(value) is Words else 1 for value in self.args)

    @property
    def plain_args(self) -> list[Arg]:
        """The arguments one by one, for a client that packs them itself (redis-py's)."""
        plain: list[Arg] = []
        for value in self.args:
            if type(value) is Words:
                plain += value.values
            else:
                plain.append(value)  # type: ignore[arg-type]
        return plain


Pending = tuple[Call, "asyncio.Future[Any]"]

S = TypeVar("S")


class SpecArgs(Generic[S]):
    """A rule's script arguments, formatted once per spec object: the same on every call.

    Specs are kept by identity; a reload makes new ones, and past ``limit`` the kept
    ones are dropped all at once (the policy in force formats its own again).
    """

    def __init__(self, format_spec: Callable[[S], Sequence[Arg]], limit: int = 256) -> None:
        self._format = format_spec
        self._limit = limit
        self._kept: dict[int, tuple[S, Words]] = {}

    def __call__(self, spec: S) -> Words:
        kept = self._kept.get(id(spec))
        if kept is None or kept[0] is not spec:
            if len(self._kept) >= self._limit:
                self._kept.clear()
            kept = self._kept[id(spec)] = (spec, Words(self._format(spec)))
        return kept[1]


SLOTS_REREAD_INTERVAL = 1.0
"""Seconds between two readings of a cluster's slots after failures."""


class Pipeline:
    """Batches :class:`Call` runs on one client; see the module's docstring."""

    def __init__(
        self,
        client: RedisClient,
        *,
        window: float = 0.0,
        limit: int = 128,
        wire: Wire | None = None,
    ) -> None:
        if window < 0 or limit < 1:
            raise ValueError(f"window must be >= 0 and limit >= 1, got {window}, {limit}")
        self.client = client
        self.wire = wire
        self.window = window
        self.limit = limit
        self.batches = 0  # batches made, and calls in them: round trips per call
        self.calls = 0
        self.round_trips = 0  # pipelines sent: one per batch, or per batch per node
        self._pending: list[Pending] = []
        self._scheduled = False
        self._slots_read_at = -math.inf  # when a cluster's slots were last read again
        self._loading: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def run(self, call: Call) -> Any:
        """The script's reply; raises what Redis or the connection raised for it.

        A script Redis does not know (restarted, or its script cache flushed) is loaded
        where the call runs, and the call sent again, once.
        """
        try:
            return await self._queue(call)
        except NoScriptError:
            await self._load_once(call)
            return await self._queue(call)

    async def _load_once(self, call: Call) -> None:
        """Load the call's script where it runs: once, however many calls met NOSCRIPT at
        about the same time (after a restart, every call in flight does)."""
        client = self.client
        where = _node_of(client, call).name if isinstance(client, RedisCluster) else ""
        key = (call.script.sha, where)
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._load([call]))
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        await asyncio.shield(loading)

    async def ping(self) -> None:
        """``PING`` on the connection the scripts take (a store breaker's probe must find
        what the calls find)."""
        wire = self.wire
        if wire is None:
            await self.client.ping()
            return
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        wire.send(pack(b"PING"), [answer])
        await answer

    def _queue(self, call: Call) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        if len(self._pending) >= self.limit:
            self._send()
        elif not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if self.window > 0:
                loop.call_later(self.window, self._send)
            else:
                loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            self.batches += 1
            self.calls += len(batch)
            wire = self.wire
            if wire is not None:  # written at once; the replies settle the futures
                self.round_trips += 1
                wire.send(_packed([call for call, _ in batch]), [future for _, future in batch])
                return
            task = asyncio.ensure_future(self._execute(batch))
            task.add_done_callback(_retrieve)

    async def _execute(self, batch: list[Pending]) -> None:
        client = self.client
        if not isinstance(client, RedisCluster):
            await self._settle(batch)
            return
        try:
            parts = await _by_node(client, batch)
        except BaseException as exc:  # the cluster's map of slots could not be had
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            await self._reread_slots(client)
            return
        await asyncio.gather(*(self._settle(part) for part in parts))

    async def _settle(self, batch: list[Pending]) -> None:
        """Send one pipeline and hand each caller its reply (or the pipeline's failure)."""
        try:
            replies = await self._pipeline([call for call, _ in batch])
        except BaseException as exc:  # the connection failed: every call in it did
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            replies = [exc]
        else:
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue  # its caller stopped waiting
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        client = self.client
        if isinstance(client, RedisCluster) and any(_moved_on(reply) for reply in replies):
            await self._reread_slots(client)

    async def _load(self, calls: list[Call]) -> None:
        """Load the scripts of these calls where they are to run."""
        client = self.client
        wire = self.wire
        if wire is not None:
            scripts = list({id(call.script): call.script for call in calls}.values())
            loop = asyncio.get_running_loop()
            loaded: list[asyncio.Future[Any]] = [loop.create_future() for _ in scripts]
            words = [(b"SCRIPT", b"LOAD", _source(script)) for script in scripts]
            wire.send(b"".join(pack(*command) for command in words), loaded)
            await asyncio.gather(*loaded)
            return
        if not isinstance(client, RedisCluster):
            for script in {id(call.script): call.script for call in calls}.values():
                await client.script_load(script.script)
            return
        where: dict[tuple[int, str], tuple[AsyncScript, ClusterNode]] = {}
        for call in calls:
            node = _node_of(client, call)
            where[id(call.script), node.name] = (call.script, node)
        await asyncio.gather(
            *(
                client.execute_command("SCRIPT LOAD", script.script, target_nodes=node)
                for script, node in where.values()
            )
        )

    async def _reread_slots(self, client: RedisCluster) -> None:
        """Read the cluster's map of slots to nodes again, keeping the connections it has.

        At most once per ``SLOTS_REREAD_INTERVAL``, however many batches fail meanwhile (a
        node down fails every batch that has calls for it). A reading that fails (no node
        answers) is left for a later failure to try again.
        """
        now = time.monotonic()
        if now - self._slots_read_at < SLOTS_REREAD_INTERVAL:
            return
        self._slots_read_at = now
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await client.nodes_manager.initialize()

    async def _pipeline(self, calls: list[Call]) -> list[Any]:
        self.round_trips += 1
        client = self.client
        if not isinstance(client, RedisCluster):
            return await _send_and_read(client, calls)
        pipe = client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(
                "EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.plain_args
            )
        return list(await pipe.execute(raise_on_error=False))


async def _by_node(client: RedisCluster, batch: list[Pending]) -> list[list[Pending]]:
    """The batch split by the node that holds each call's slot, as the client knows it."""
    await client.initialize()  # at once unless it has yet to (or must again) read the map
    parts: dict[str, list[Pending]] = {}
    for pending in batch:
        parts.setdefault(_node_of(client, pending[0]).name, []).append(pending)
    return list(parts.values())


def _node_of(client: RedisCluster, call: Call) -> ClusterNode:
    """The master that serves the slot of the call's keys."""
    node = client.get_node_from_key(call.keys[0])
    if node is None:  # only asked of replicas
        raise SlotNotCoveredError(f"no node serves the key {call.keys[0]!r}")
    return node


def _fail(batch: list[Pending], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _moved_on(reply: object) -> bool:
    """Whether a failure says the cluster's slots may have moved to other nodes."""
    return isinstance(reply, (*RedisCluster.ERRORS_ALLOW_RETRY, RedisClusterException))


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a batch's own failure as seen: its callers were handed it already."""
    if not task.cancelled():
        task.exception()


async def _send_and_read(client: Redis, calls: list[Call]) -> list[Any]:
    """One pipeline on one connection of the pool, packed here: the commands are all
    ``EVALSHA`` with plain arguments, and packing them directly costs a fraction of what
    redis-py's generic pipeline spends per command. An error reply is that call's reply;
    a failure of the connection fails them all (and the connection is dropped)."""
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await connection.send_packed_command(_packed(calls), check_health=False)
        replies: list[Any] = []
        for _ in calls:
            try:
                replies.append(await connection.read_response(disconnect_on_error=True))
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


def _packed(calls: list[Call]) -> bytes:
    """The calls as RESP arrays of bulk strings, one after the other."""
    out: list[bytes] = []
    add = out.append
    for call in calls:
        keys = call.keys
        body = [_bulk(key) for key in keys]
        words = 3 + len(keys)
        for value in call.args:
            if type(value) is Words:
                body.append(value.encoded)
                words += value.count
            else:
                body.append(_bulk(value))  # type: ignore[arg-type]
                words += 1
        count = b"%d" % len(keys)
        add(
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%s\r\n"
            % (words, call.script.sha.encode(), len(count), count)
        )
        out += body
    return b"".join(out)


def _source(script: AsyncScript) -> bytes:
    source = script.script
    return source.encode() if isinstance(source, str) else bytes(source)


def _bulk(value: Arg) -> bytes:
    """One argument as a RESP bulk string."""
    word = _word(value)
    return b"$%d\r\n%s\r\n" % (len(word), word)


def _word(value: Arg) -> bytes:
    if isinstance(value, str):  # a key from client input may hold a lone surrogate
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    return value
