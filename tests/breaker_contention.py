"""One process recording outcomes of a shared Redis breaker, for tests/test_redis_breakers.py.

Run by multiprocessing's ``spawn``, so it is a module of its own that imports little (a
spawned process imports the module of the function it runs). Each process has its own
event loop and client, waits at a barrier with the others, then keeps ``in_flight``
recordings running at once, ``rounds`` times over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from policy_engine.language.model import (
    CircuitBreakerSpec,
    Expression,
    Mode,
    SlowCallSpec,
    WindowSpec,
)
from policy_engine.state.redis_breakers import RedisBreakers

WAIT = 10.0  # a ceiling against a worker that never comes, not a measure of speed
SLOW = 2.0
FAST = 0.1


@dataclass(frozen=True)
class _Never:
    """The breaker's ``match``, which recording never evaluates."""

    def evaluate(self, activation: Any) -> Any:
        return False


def roomy_breaker(name: str, size: int) -> CircuitBreakerSpec:
    """A count window of ``size`` calls that cannot open before it holds ``size`` failures."""
    return CircuitBreakerSpec(
        name=name,
        match=Expression("false", "circuit_breakers.match", _Never()),
        mode=Mode.ENFORCE,
        failure_rate=1.0,
        window=WindowSpec(calls=size),
        minimum_calls=size,
        slow_call=SlowCallSpec(over=1.0, rate=1.0),
    )


def outcome(worker: int, index: int) -> tuple[bool, float]:
    """Whether call ``index`` of ``worker`` fails, and how long it took (slow or fast)."""
    return (worker + index) % 3 == 0, SLOW if (worker + index) % 5 == 0 else FAST


@dataclass(frozen=True)
class Job:
    """What one worker records: ``rounds`` times ``in_flight`` outcomes at once."""

    url: str
    prefix: str
    window: int
    worker: int
    rounds: int
    in_flight: int


async def record_outcomes(job: Job, ready: Callable[[], object]) -> int:
    """Record the job's outcomes; returns how many reported a transition.

    ``ready`` is called once the client is connected and the script loaded, and returns
    when every worker is: the recordings then start together.
    """
    spec = roomy_breaker("shared", job.window)
    client = Redis.from_url(job.url)
    breakers = RedisBreakers(client, job.prefix)
    transitions = 0
    try:
        await client.script_load(
            breakers.record(spec, 1000.0, failed=False, duration=0)[0].script.script
        )
        ready()
        for round_ in range(job.rounds):
            calls = []
            for index in range(round_ * job.in_flight, (round_ + 1) * job.in_flight):
                failed, duration = outcome(job.worker, index)
                calls.append(breakers.record(spec, 1000.0, failed=failed, duration=duration))
            replies = await asyncio.gather(
                *(call.script(keys=call.keys, args=call.plain_args) for call, _ in calls)
            )
            transitions += sum(
                parse(reply) is not None for (_, parse), reply in zip(calls, replies, strict=True)
            )
    finally:
        await client.aclose()
    return transitions


def run_worker(job: Job, barrier: Any, results: Any) -> None:
    """A process's body: meet the others at ``barrier``, record, report to ``results``."""
    transitions = asyncio.run(record_outcomes(job, lambda: barrier.wait(WAIT)))
    results.put((job.worker, transitions))
