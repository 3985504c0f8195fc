"""The engine's work for one event whose payload a hostile client crafted, against a small one.

The shipped policy, plus five deny rules outside the fast path that read the payload
(``matches``, ``exists``, ``filter``, a nested field, an optional field), judged by
cel-expr-python. Each round sends, on connections of their own, a small payload and
64 KB payloads built to cost: a long list a comprehension iterates, the longest list the engine's
budget lets it iterate, deep lists under a key a condition reads, and thousands of keys no
condition reads. The samples alternate, so
the machine's noise falls on all of them alike. Reported: median and spread (p10-p90) of
the event-loop time per event (the engine's verdict, the breaker's permit and outcome),
and each payload's median against the small one's. Target: within 5x.

    python -m benchmarks.adversarial_bench [--rounds 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import Engine, EventVerdict, conn_context, event_context
from policy_engine.language.model import PolicySet

POLICIES = Path(__file__).resolve().parent.parent / "policies"
TARGET_BYTES = 64 * 1024
HOSTILE_RULES = [
    'event.payload.action.matches("(rm|sudo)")',
    'event.payload.tags.exists(t, t == "admin")',
    'event.payload.tags.filter(t, t.startsWith("sudo")).size() > 0',
    'has(event.payload.args.cmd) && event.payload.args.cmd.matches("rm -rf")',
    'has(event.payload.meta) && event.payload.meta.level == "root"',
]


def hostile_policy() -> PolicySet:
    """The shipped policy with deny rules that read the payload outside the fast path."""
    data = yaml.safe_load((POLICIES / "policies.yaml").read_text(encoding="utf-8"))
    rules = data["authorization"]["rules"]
    for at, when in enumerate(HOSTILE_RULES):
        rules.append(
            {
                "name": f"hostile-{at}",
                "hook": "event",
                "when": f'event.name == "oh_user_action" && {when}',
                "effect": "deny",
            }
        )
    return compile_text(yaml.safe_dump(data), base_dir=POLICIES).policy


def padded(build: Any) -> Any:
    """Grow ``build(n)`` until its JSON is just over 64 KB; decoded, as a server sees it."""
    n = 1
    while len(json.dumps(build(n))) < TARGET_BYTES:
        n = int(n * 1.1) + 1
    return json.loads(json.dumps(build(n)))


def payloads() -> dict[str, Any]:
    def long_list(n: int) -> Any:
        return {"action": "run", "args": {"command": "ls"}, "tags": [f"t{i}" for i in range(n)]}

    def deep_lists(n: int) -> Any:
        nested: Any = [0]
        for _ in range(64):  # python-socketio's decoder refuses much deeper nesting
            nested = [nested, 1]
        return {"action": "run", "args": {"command": "ls", "cmd": "ls", "x": [nested] * n}}

    def many_keys(n: int) -> Any:
        keys = {f"k{i}": [i] for i in range(n)}
        return {"action": "run", "args": {"command": "ls"}, "tags": ["a", "b"]} | keys

    def budget_list(n: int) -> Any:
        # The longest list the engine's budget lets a filter iterate, padded with keys.
        keys = {f"k{i}": [i] for i in range(n)}
        return {"action": "run", "args": {"command": "ls"}, "tags": ["t"] * 70} | keys

    return {
        "small": {"action": "run", "args": {"command": "ls"}, "tags": ["a", "b"]},
        "long list (tags)": padded(long_list),
        "budget list (tags)": padded(budget_list),
        "deep lists (args)": padded(deep_lists),
        "many keys (unread)": padded(many_keys),
    }


class SteppingClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def measure(rounds: int) -> dict[str, tuple[list[float], str]]:
    clock = SteppingClock()
    engine = Engine(hostile_policy(), clock=clock)
    cases = payloads()
    conns = {}
    for at, name in enumerate(cases):
        conn = conn_context(sid=f"s{at}", ip=f"192.0.2.{at + 1}", user_id=f"u{at}")
        conn["conversation_id"] = "c1"
        await engine.on_connect(conn, {"sub": f"u{at}"})
        conns[name] = conn
    sizes = {name: len(json.dumps(payload)) for name, payload in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    outcomes: dict[str, str] = {}
    perf = time.perf_counter_ns
    gc.collect()
    for _ in range(rounds):
        clock.now += 0.03  # 33 events/s per connection: under the shipped 50/s
        for name, payload in cases.items():
            conn = conns[name]
            start = perf()
            event = event_context("oh_user_action", payload, size_bytes=sizes[name])
            verdict = engine.judge_event_now(conn, {"sub": conn["user_id"]}, event)
            assert type(verdict) is EventVerdict  # the memory store answers at once
            decision, guard = verdict.decision, verdict.guard
            if decision.allowed and guard is not None and guard.permits:
                await engine.after_call(guard, conn, event, None, None)
            samples[name].append((perf() - start) / 1000)
            outcomes[name] = decision.rule or "allow"
    return {name: (samples[name], outcomes[name]) for name in cases}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2_000)
    args = parser.parse_args()
    asyncio.run(measure(100))  # warm up
    results = asyncio.run(measure(args.rounds))
    small = statistics.median(results["small"][0])
    print(f"{args.rounds} rounds, cel-expr-python, times in microseconds")
    print(f"{'payload':<20} {'median':>9} {'p10':>9} {'p90':>9} {'ratio':>7}  outcome")
    for name, (samples, outcome) in results.items():
        ordered = sorted(samples)
        median = statistics.median(ordered)
        p10, p90 = ordered[len(ordered) // 10], ordered[len(ordered) * 9 // 10]
        print(f"{name:<20} {median:9.2f} {p10:9.2f} {p90:9.2f} {median / small:6.1f}x  {outcome}")


if __name__ == "__main__":
    main()
