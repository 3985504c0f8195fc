"""The engine's full decision work for one incoming event, against an empty policy.

Target: under the shipped policy on the memory store, the work for one `oh_user_action`
(payload checks, authorization, shedding, rate limits, breaker permit and outcome: every
rule an event can meet) costs a median of at most 5 us more than the same calls under an
empty policy, measured in the same run. Both CEL engines are reported.

    python -m benchmarks.decision_bench [--events 50000] [--backend NAME ...]
        [--path hooks|adapter]

``--path hooks`` (the default) awaits the engine's three hooks, ``on_event``,
``before_call`` and ``after_call``; ``--path adapter`` makes the calls the Socket.IO
adapter makes on the memory store: ``judge_event_now`` and, after the handler,
``after_call_now`` (``after_call`` where the engine has none).

``--loop shipped|empty`` only runs the events, untimed, for an instruction counter: the
difference between ``valgrind --tool=callgrind`` totals at ``--events N`` and at
``--events 0``, divided by N, is the instructions per event, whatever else the machine
runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from pathlib import Path

from policy_engine.compiler.pipeline import compile_file, compile_text
from policy_engine.core.engine import Engine, conn_context, event_context
from policy_engine.language.model import PolicySet

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"


class SteppingClock:
    """Advances 30 ms per event: 33 events/s, under the shipped 50/s limit."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def measure(policy: PolicySet, events: int, path: str = "hooks") -> list[float]:
    clock = SteppingClock()
    engine = Engine(policy, clock=clock)
    conn = conn_context(sid="s1", ip="192.0.2.1", user_id="alice", conversation_id="c1")
    claims = {"sub": "alice", "role": "editor"}
    await engine.on_connect(conn, claims)
    payload = {"action": "run", "args": {"command": "ls"}}
    samples = []
    perf = time.perf_counter_ns
    after_call_now = getattr(engine, "after_call_now", None)
    gc.collect()
    for _ in range(events):
        clock.now += 0.03
        start = perf()
        event = event_context("oh_user_action", payload, size_bytes=64, has_ack=True)
        if path == "adapter":
            verdict = engine.judge_event_now(conn, claims, event)
            guard = getattr(verdict, "guard", None)
            if guard is not None and guard.permits:
                if after_call_now is not None:
                    after_call_now(guard, conn, event, None, None)
                else:
                    await engine.after_call(guard, conn, event, None, None)
        else:
            decision = await engine.on_event(conn, claims, event)
            if decision.allowed:
                guard = await engine.before_call(conn, claims, event)
                if not hasattr(guard, "outcome"):
                    await engine.after_call(guard, conn, event, None, None)  # type: ignore[arg-type]
        samples.append((perf() - start) / 1000)
    return samples


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--backend", action="append", default=None)
    parser.add_argument("--path", choices=("hooks", "adapter"), default="hooks")
    parser.add_argument("--loop", choices=("shipped", "empty"), default=None)
    args = parser.parse_args()
    backends = args.backend or ["cel-expr-python", "cel-python"]
    if args.loop is not None:
        backend = backends[0]
        if args.loop == "shipped":
            policy = compile_file(SHIPPED, backend=backend).policy
        else:
            policy = compile_text("version: 1\n", backend=backend).policy
        asyncio.run(measure(policy, args.events, args.path))
        return
    print(
        f"{args.events} oh_user_action events, memory store, {args.path} path, "
        "times in microseconds"
    )
    print(f"{'backend':<16} {'policy':<8} {'median':>8} {'p99':>8} {'+median':>8} {'+p99':>8}")
    for backend in backends:
        empty = compile_text("version: 1\n", backend=backend).policy
        shipped = compile_file(SHIPPED, backend=backend).policy
        events = args.events if backend == "cel-expr-python" else max(2_000, args.events // 20)
        asyncio.run(measure(shipped, 2_000, args.path))  # warm up
        base_median, base_p99 = summary(asyncio.run(measure(empty, events, args.path)))
        median, p99 = summary(asyncio.run(measure(shipped, events, args.path)))
        print(f"{backend:<16} {'empty':<8} {base_median:8.2f} {base_p99:8.2f}")
        print(
            f"{backend:<16} {'shipped':<8} {median:8.2f} {p99:8.2f} "
            f"{median - base_median:8.2f} {p99 - base_p99:8.2f}"
        )


if __name__ == "__main__":
    main()
