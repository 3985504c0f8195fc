"""The decision for one event on the Redis store, against the memory store.

The same work as ``decision_bench`` (one ``oh_user_action`` under the shipped policy:
payload, authorization, shedding, the two rate limits, the breaker's permit and outcome),
with the engine's state in a Redis the benchmark starts on a free loopback port. Under the
shipped policy the per-connection limit stays in the process (``scope: local``); the
per-conversation limit and the breaker are shared, so each event makes a few round trips.

    python -m benchmarks.store_bench [--events 5000] [--tasks 50]

Reports one event at a time (latency: until its handler could start, as the adapter asks
the limits and the permit at once on a shared store; the outcome is recorded after) and
``--tasks`` connections deciding at once (throughput, outcomes included), for both stores.
Needs ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.decision_bench import SHIPPED, summary
from benchmarks.echo_bench import free_port
from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.decision import Decision
from policy_engine.core.engine import (
    BreakerGuard,
    Engine,
    EventVerdict,
    conn_context,
    event_context,
)
from policy_engine.language.model import PolicySet
from policy_engine.state.memory import StateStore
from policy_engine.state.redis_store import RedisStore
from policy_engine.state.redis_wire import pack

PAYLOAD = {"action": "run", "args": {"command": "ls"}}


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", directory]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


class SteppingClock:
    """Wall-clock seconds that advance 30 ms per event: 33 events/s per connection. (Redis
    keeps its own time: there, a new connection every 40 events keeps the limits admitting.)"""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def decide(engine: Engine, conn: dict[str, Any], claims: dict[str, Any]) -> float:
    """One event as the adapter decides it; returns when its handler could start (the
    latency a client sees added), after recording the call's outcome.

    As the adapter does: what the state answers without I/O at once; on a shared store the
    limits and the breaker's permit in one script (or two calls in one pipeline when the
    engine cannot); the outcome is recorded after the client's answer.
    """
    started = time.perf_counter_ns()
    event = event_context("oh_user_action", PAYLOAD, size_bytes=64, has_ack=True)
    verdict = engine.judge_event_now(conn, claims, event)
    guard: BreakerGuard | Decision | None
    if isinstance(verdict, EventVerdict):
        decision, guard = verdict.decision, verdict.guard
        if guard is None and decision.allowed:
            guard = await engine.before_call(conn, claims, event)
    else:
        together = await engine.settle_with_permits(verdict, conn, claims, event)
        if together is not None:  # one script for the limits and the permit
            decision, guard = together
        else:  # two calls in one pipeline
            asking = asyncio.ensure_future(engine.before_call(conn, claims, event))
            decision = await engine.settle_event(verdict)
            guard = await asking
            if not decision.allowed and isinstance(guard, BreakerGuard):
                await engine.release_permits(guard)
    decided = (time.perf_counter_ns() - started) / 1000
    if decision.allowed and isinstance(guard, BreakerGuard):
        await engine.after_call(guard, conn, event, None, None)
    return decided


async def latencies(policy: PolicySet, store: StateStore | None, events: int) -> list[float]:
    clock = SteppingClock()
    engine = Engine(policy, store, clock=clock)
    conn = conn_context(sid="s1", ip="192.0.2.1", user_id="alice", conversation_id="c1")
    claims = {"sub": "alice", "role": "editor"}
    await engine.on_connect(conn, claims)
    samples = []
    for index in range(events):
        clock.now += 0.03
        if index % 40 == 0:  # a new connection and conversation: every limit admits
            conn = {**conn, "sid": f"s{index}", "conversation_id": f"c{index}"}
        samples.append(await decide(engine, conn, claims))
    return samples


async def throughput(policy: PolicySet, store: StateStore | None, tasks: int, each: int) -> float:
    """Decisions per second with ``tasks`` connections deciding at once."""
    engine = Engine(policy, store, clock=time.time)

    async def connection(index: int) -> None:
        conn = conn_context(
            sid=f"s{index}", ip="192.0.2.1", user_id=f"u{index}", conversation_id=f"c{index}"
        )
        for _ in range(each):
            await decide(engine, conn, {"sub": f"u{index}"})
            await asyncio.sleep(0)

    started = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(tasks)))
    return tasks * each / (time.perf_counter() - started)


async def pings(store: RedisStore, count: int) -> list[float]:
    """``PING`` round trips one at a time over the connection the store's scripts use: the
    floor of one decision that needs Redis on this machine today."""
    wire = store._wire
    assert wire is not None
    loop = asyncio.get_running_loop()
    samples = []
    for _ in range(count):
        started = time.perf_counter_ns()
        answer: asyncio.Future[Any] = loop.create_future()
        wire.send(pack(b"PING"), [answer])
        await answer
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


async def run(url: str, events: int, tasks: int, rounds: int) -> None:
    policy = compile_file(SHIPPED).policy
    redis_store = RedisStore(url)
    stores: dict[str, StateStore | None] = {"memory": None, "redis": redis_store}
    print(f"{events} oh_user_action decisions one at a time; {tasks} connections at once;")
    print(f"{rounds} rounds, the two stores alternating")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in stores}
    ping_medians = []
    for store in stores.values():
        await latencies(policy, store, 200)  # warm up
    pipeline = redis_store._pipeline
    batches = calls = decided = 0
    for _ in range(rounds):
        ping_medians.append(summary(await pings(redis_store, events))[0])
        for name, store in stores.items():
            median, p99 = summary(await latencies(policy, store, events))
            before = (pipeline.batches, pipeline.calls)
            each = max(1, events // tasks)
            rate = await throughput(policy, store, tasks, each)
            if store is redis_store:
                batches += pipeline.batches - before[0]
                calls += pipeline.calls - before[1]
                decided += tasks * each
            results[name].append((median, p99, rate))
    print(f"{'store':<8} {'median us':>22} {'p99 us':>22} {'decisions/s':>24}")
    for name, rows in results.items():
        columns = [[row[i] for row in rows] for i in range(3)]
        cells = [f"{statistics.median(c):.1f} [{min(c):.1f}-{max(c):.1f}]" for c in columns[:2]] + [
            f"{statistics.median(columns[2]):.0f} [{min(columns[2]):.0f}-{max(columns[2]):.0f}]"
        ]
        print(f"{name:<8} {cells[0]:>22} {cells[1]:>22} {cells[2]:>24}")
    low, high = min(ping_medians), max(ping_medians)
    print(
        f"PING over the store's connection, one at a time: median "
        f"{statistics.median(ping_medians):.1f} us [{low:.1f}-{high:.1f}]"
    )
    if decided:
        print(
            f"redis at {tasks} in flight: {calls / decided:.2f} script calls and "
            f"{batches / decided:.3f} round trips (pipelines) per decision"
        )
    await redis_store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with redis_server() as url:
        asyncio.run(run(url, args.events, args.tasks, args.rounds))


if __name__ == "__main__":
    main()
