"""Breaker outcomes recorded together: one script per breaker per pass of the event loop.

Every guarded call that ran records its outcome, so under load a process records as many
outcomes as it admits events, each one a script call of its own to make, send and await.
:class:`OutcomeBatches` gathers the outcomes of one breaker recorded within one pass of
the event loop (at most ``limit``) and sends them as one ``RECORD_MANY`` script, which
records them in turn exactly as that many ``RECORD`` calls would: nothing is lost or
merged, and each caller still gets its own outcome's transition. An outcome whose caller
stopped waiting is recorded all the same. A batch that fails fails each of its callers, as
their own calls would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from policy_engine.algorithms.breaker import Transition
from policy_engine.language.model import CircuitBreakerSpec
from policy_engine.state.redis_breakers import RedisBreakers
from policy_engine.state.redis_pipeline import Call

Outcome = tuple[float | None, bool, float]
"""``(now, failed, duration)``: ``now`` None for Redis's own clock."""


class _Batch:
    __slots__ = ("futures", "outcomes", "spec")

    def __init__(self, spec: CircuitBreakerSpec) -> None:
        self.spec = spec
        self.outcomes: list[Outcome] = []
        self.futures: list[asyncio.Future[Transition | None]] = []


class OutcomeBatches:
    """Outcomes waiting for the next pass of the loop, one batch per breaker spec."""

    def __init__(
        self, breakers: RedisBreakers, run: Callable[[Call], Awaitable[Any]], limit: int = 64
    ) -> None:
        if limit < 1:
            raise ValueError(f"a batch holds at least one outcome, got {limit}")
        self._breakers = breakers
        self._run = run
        self._limit = limit
        self._open: dict[int, _Batch] = {}  # by the spec's identity: a reload makes new ones
        self._sending: set[asyncio.Task[None]] = set()

    def record(
        self, spec: CircuitBreakerSpec, now: float | None, *, failed: bool, duration: float
    ) -> asyncio.Future[Transition | None]:
        """The future of this outcome's transition (None: the circuit did not change)."""
        loop = asyncio.get_running_loop()
        batch = self._open.get(id(spec))
        if batch is None or batch.spec is not spec:
            batch = self._open[id(spec)] = _Batch(spec)
            loop.call_soon(self._flush, id(spec), batch)
        future: asyncio.Future[Transition | None] = loop.create_future()
        batch.outcomes.append((now, failed, duration))
        batch.futures.append(future)
        if len(batch.outcomes) >= self._limit:
            self._flush(id(spec), batch)
        return future

    async def aclose(self) -> None:
        """Send every outcome still waiting for the loop's next pass, and wait for the
        replies of those sent: what was recorded before a close is kept, and nothing is
        sent on a connection after it closed."""
        for key, batch in list(self._open.items()):
            self._flush(key, batch)
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def _flush(self, key: int, batch: _Batch) -> None:
        if self._open.get(key) is batch:
            del self._open[key]
        if not batch.outcomes:  # sent already, full
            return
        outcomes, futures = batch.outcomes, batch.futures
        batch.outcomes, batch.futures = [], []  # a second flush of it finds nothing
        task = asyncio.ensure_future(self._send(batch.spec, outcomes, futures))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self,
        spec: CircuitBreakerSpec,
        outcomes: list[Outcome],
        futures: list[asyncio.Future[Transition | None]],
    ) -> None:
        try:
            call, read = self._breakers.record_many(spec, outcomes)
            transitions = read(await self._run(call))
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for future, transition in zip(futures, transitions, strict=True):
            if not future.done():  # its caller stopped waiting
                future.set_result(transition)
