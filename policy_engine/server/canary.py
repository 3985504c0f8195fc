"""The live canary: a candidate policy judging live traffic in shadow, on its own state.

``serve --candidate FILE`` (``build_app(..., candidate=FILE)``) makes a :class:`Canary`
the engine's tap: every decision the enforced policy makes is queued, with the contexts it
was made on, and judged again by the candidate (:class:`~policy_engine.core.rejudge.Rejudge`,
its own memory state, the time of the enforced decision on the engine's clock as its
clock) by a task of its own, after
the client was answered. Clients only ever get the enforced policy's decisions; the
candidate costs the copy of the contexts on the request path and its own judgement off
it. A full queue drops (and counts) what it cannot hold rather than grow.

Disagreements are counted in ``policy_engine_candidate_disagreements_total{rule,from,to}``,
summarised in ``/status`` (``candidate``) and logged as ``candidate.disagreed`` with the
connection and the enforced decision's correlation id, at most ``log_rate`` lines a
second (the lines left out are counted in the next one). SIGHUP reloads the candidate
file too, through the same all-or-nothing reload as the enforced policy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.decision import Decision
from policy_engine.core.rejudge import DISCONNECT, Change, Changes, Judgement, Rejudge, verdict
from policy_engine.language.contexts import Hook
from policy_engine.language.model import PolicySet
from policy_engine.observe.metrics import MetricsObserver
from policy_engine.server.reload import PolicyReloader

_log = structlog.get_logger("policy_engine")
_YIELD_EVERY = 64  # judgements between two turns of the event loop


class Canary:
    """A candidate policy in shadow; a :class:`~policy_engine.core.tap.DecisionTap`."""

    def __init__(
        self,
        path: str | Path,
        *,
        metrics: MetricsObserver | None = None,
        backend: str | None = None,
        queue_limit: int = 10_000,
        log_rate: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        policy = compile_file(path, backend=backend).policy
        self.rejudge = Rejudge(policy)
        self.reloader = PolicyReloader(
            path, self.rejudge.engine, backend=backend, on_install=[self._installed]
        )
        self.changes = Changes()
        self.queue_limit = queue_limit
        self.dropped = 0
        self.failed = 0
        self._clock = clock
        self._queue: deque[Judgement] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._counters = metrics.track_candidate() if metrics is not None else None
        self._log_rate = log_rate
        self._log_allowance = log_rate
        self._log_at = clock()
        self._suppressed = 0
        _log.info("candidate.loaded", version=policy.version, path=str(path), audit=False)

    @property
    def policy(self) -> PolicySet:
        return self.rejudge.engine.policy

    def _installed(self, policy: PolicySet) -> None:
        """A reloaded candidate starts a new comparison (its own state carries over by rule)."""
        self.changes = Changes()
        _log.info("candidate.reloaded", version=policy.version, audit=False)

    # -- the tap: on the request path, copy and queue ------------------------------------------

    def judged(  # noqa: PLR0917 (the tap's signature: positional, one call per decision)
        self,
        hook: Hook,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: Mapping[str, Any] | None,
        load: Mapping[str, Any],
        decision: Decision,
    ) -> None:
        payload = decision.payload
        self._put(
            Judgement(
                hook.value,
                self._clock(),
                dict(conn),
                claims,
                dict(event) if event is not None else None,
                load,  # replaced by each sample, never changed in place
                verdict(decision),
                decision.rule,
                payload.get("correlation_id") if payload is not None else None,
            )
        )

    def disconnected(self, conn: Mapping[str, Any]) -> None:
        conn = {"sid": conn["sid"], "user_id": conn["user_id"], "ip": conn["ip"]}
        self._put(Judgement(DISCONNECT, self._clock(), conn))

    def _put(self, judgement: Judgement) -> None:
        if len(self._queue) >= self.queue_limit:
            self.dropped += 1
            return
        self._queue.append(judgement)
        wake = self._wake
        if wake is not None:
            wake.set()

    # -- off the request path: judge again and compare ------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        if self._queue:
            self._wake.set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def idle(self) -> None:
        """Wait until every queued decision is judged (tests, benchmarks)."""
        while self._queue:
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            await self.drain()

    async def drain(self) -> int:
        """Judge every queued decision, in order, letting the loop run between batches;
        how many were judged."""
        done = 0
        queue = self._queue
        while queue:
            self._judge(await self._decide(queue[0]))
            queue.popleft()
            done += 1
            if done % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        return done

    async def _decide(self, judgement: Judgement) -> tuple[Judgement, Decision | None]:
        try:
            return judgement, await self.rejudge.decide(judgement)
        except Exception:
            self.failed += 1
            if self.failed == 1:
                _log.exception("candidate.failed", hook=judgement.hook, audit=False)
            return judgement, None

    def _judge(self, judged: tuple[Judgement, Decision | None]) -> None:
        judgement, decision = judged
        change = self.changes.add(judgement, decision)
        counters = self._counters
        if counters is not None and decision is not None:
            counters[0].inc()
        if change is None:
            return
        if counters is not None:
            counters[1].labels(change.rule, change.before, change.after).inc()
        self._report(change)

    def _report(self, change: Change) -> None:
        """One log line per disagreement, ``log_rate`` a second at most (a token bucket)."""
        now = self._clock()
        rate = self._log_rate
        self._log_allowance = min(rate, self._log_allowance + (now - self._log_at) * rate)
        self._log_at = now
        if self._log_allowance < 1.0:
            self._suppressed += 1
            return
        self._log_allowance -= 1.0
        suppressed, self._suppressed = self._suppressed, 0
        fields = change.to_dict()
        _log.info(
            "candidate.disagreed",
            outcome=fields.pop("kind"),
            event_name=fields.pop("event"),
            suppressed=suppressed,
            audit=False,
            **fields,
        )

    # -- what /status shows ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        summary = self.changes.to_dict()
        summary["by_rule"] = summary["by_rule"][:20]
        return {
            **self.reloader.status(),
            **summary,
            "queued": len(self._queue),
            "dropped": self.dropped,
            "failed": self.failed,
        }
