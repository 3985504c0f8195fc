"""The request-path cost of the decision log and of a live canary, against neither.

Under the shipped policy on the memory store, one `oh_user_action` judged as the adapter
judges it (``judge_event_now``: size, shedding, rate limits, schema, authorization and
the breaker permit in one call, then the breaker outcome), with the engine's tap:

- off: no tap (a policy without ``decision_log``, no ``--candidate``);
- log: the decision log, every decision written to a file (``sample: 100%``);
- log-10%: the same, one decision in ten written (``sample: 10%``);
- canary: a candidate (the shipped policy again) queued for judging off the request path;
- both.

The four run in interleaved rounds in one process, so that the machine's drift falls on
each alike. Also reported: the candidate's own judging, off the request path, per decision
(the canary's ``drain``), and the empty policy's cost, against which decision_bench's
target is written (shipped policy at most +10 us median, +30 us p99).

    python -m benchmarks.canary_bench [--events 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.decision_bench import SHIPPED, SteppingClock, summary
from policy_engine.compiler.pipeline import compile_file, compile_text
from policy_engine.core.engine import Engine, EventVerdict, conn_context, event_context
from policy_engine.core.tap import DecisionTap, Taps
from policy_engine.language.model import DecisionLogSpec, PolicySet
from policy_engine.observe.decision_log import DecisionLog
from policy_engine.server.canary import Canary

CONFIGS = ("empty", "off", "log", "log-10%", "canary", "both")


async def measure(
    policy: PolicySet, tap: DecisionTap | None, events: int, clock: SteppingClock, sid: str
) -> list[float]:
    """One connection's events on a fresh engine; the connection closes at the end (so a
    canary, whose state outlives the engine, sees what the engine saw)."""
    engine = Engine(policy, clock=clock)
    engine.tap = tap
    conn = conn_context(sid=sid, ip="192.0.2.1", user_id="alice", conversation_id="c1")
    claims = {"sub": "alice", "role": "editor"}
    await engine.on_connect(conn, claims)
    payload = {"action": "run", "args": {"command": "ls"}}
    samples = []
    perf = time.perf_counter_ns
    gc.collect()
    for _ in range(events):
        clock.now += 0.03  # 33 events/s: under the shipped limit
        start = perf()
        event = event_context("oh_user_action", payload, size_bytes=64, has_ack=True)
        verdict = engine.judge_event_now(conn, claims, event)
        assert type(verdict) is EventVerdict
        guard = verdict.guard
        if guard is not None and guard.permits:
            await engine.after_call(guard, conn, event, None, None)
        samples.append((perf() - start) / 1000)
    await engine.on_disconnect(conn)
    return samples


async def run(events: int, rounds: int, directory: Path) -> None:
    shipped = compile_file(SHIPPED).policy
    empty = compile_text("version: 1\n").policy
    logged = dataclasses.replace(
        shipped, decision_log=DecisionLogSpec(path=str(directory / "decisions.jsonl"))
    )
    log = DecisionLog(logged)
    sampled = DecisionLog(
        dataclasses.replace(
            shipped,
            decision_log=DecisionLogSpec(path=str(directory / "sampled.jsonl"), sample=0.1),
        )
    )
    # One clock for all: the canary reads the engine's clock, as build_app wires it.
    clock = SteppingClock()
    canary = Canary(SHIPPED, queue_limit=events + 10, clock=clock)
    taps: dict[str, tuple[PolicySet, DecisionTap | None]] = {
        "empty": (empty, None),
        "off": (shipped, None),
        "log": (shipped, log),
        "log-10%": (shipped, sampled),
        "canary": (shipped, canary),
        "both": (shipped, Taps([log, canary])),
    }
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    judging: list[float] = []
    await measure(shipped, None, 2_000, clock, "warm-up")
    for round_ in range(rounds):
        for name in CONFIGS:
            policy, tap = taps[name]
            samples[name] += await measure(policy, tap, events, clock, f"{name}-{round_}")
            if name in {"canary", "both"}:
                started = time.perf_counter_ns()
                judged = await canary.drain()
                judging.append((time.perf_counter_ns() - started) / 1000 / judged)
    log.close()
    sampled.close()
    written = (directory / "decisions.jsonl").stat().st_size
    print(f"{events * rounds} oh_user_action events per configuration, shipped policy,")
    print("memory store, cel-expr-python; times in microseconds per event")
    print(f"{'config':<8} {'median':>8} {'p99':>8} {'+median':>8} {'+p99':>8} (vs off)")
    off_median, off_p99 = summary(samples["off"])
    for name in CONFIGS:
        median, p99 = summary(samples[name])
        print(
            f"{name:<8} {median:8.2f} {p99:8.2f} {median - off_median:+8.2f} {p99 - off_p99:+8.2f}"
        )
    empty_median, empty_p99 = summary(samples["empty"])
    both_median, both_p99 = summary(samples["both"])
    print(
        f"both vs empty policy: +{both_median - empty_median:.2f} median, "
        f"+{both_p99 - empty_p99:.2f} p99 (decision_bench target: +10 median, +30 p99)"
    )
    print(f"candidate judging off the request path: {statistics.median(judging):.2f} per event")
    print(f"candidate disagreements with itself: {canary.changes.changed} (must be 0)")
    print(f"decision log: {written / log.written:.0f} bytes per line")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(args.events, args.rounds, Path(directory)))


if __name__ == "__main__":
    main()
