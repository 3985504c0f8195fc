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
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Arg = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class Call:
    """One script run: the script (registered on the client) with its keys and arguments."""

    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Arg]


Pending = tuple[Call, "asyncio.Future[Any]"]


class Pipeline:
    """Batches :class:`Call` runs on one client; see the module's docstring."""

    def __init__(self, client: Redis, *, window: float = 0.0, limit: int = 128) -> None:
        if window < 0 or limit < 1:
            raise ValueError(f"window must be >= 0 and limit >= 1, got {window}, {limit}")
        self.client = client
        self.window = window
        self.limit = limit
        self.batches = 0  # pipelines sent, and calls in them: round trips per call
        self.calls = 0
        self._pending: list[Pending] = []
        self._scheduled = False

    async def run(self, call: Call) -> Any:
        """The script's reply; raises what Redis or the connection raised for it."""
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
        return await future

    def _send(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            self.batches += 1
            self.calls += len(batch)
            task = asyncio.ensure_future(self._execute(batch))
            task.add_done_callback(_retrieve)

    async def _execute(self, batch: list[Pending]) -> None:
        try:
            replies = await self._replies([call for call, _ in batch])
        except BaseException as exc:  # the connection failed: every call in it did
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _replies(self, calls: list[Call]) -> list[Any]:
        replies = await self._pipeline(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {id(calls[i].script): calls[i].script for i in missing}.values():
                await self.client.script_load(script.script)
            again = await self._pipeline([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: list[Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a batch's own failure as seen: its callers were handed it already."""
    if not task.cancelled():
        task.exception()
