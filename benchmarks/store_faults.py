"""Redis failing under load: killed and restarted, then hung (SIGSTOP) and resumed.

    python -m benchmarks.store_faults [--modes fail_open fail_closed local] [--tasks 20]

For each ``on_store_error`` mode, ``--tasks`` connections decide ``oh_user_action`` events
without pause (the shipped policy's decision, with its per-conversation limit enforced and
global, and its ``store_timeout: 20ms``) against a Redis this benchmark starts on a free
loopback port. Two seconds in, Redis is SIGKILLed; two seconds later it is started again
on the same port; three seconds after that it is SIGSTOPped for five seconds. It reports,
per phase, the decisions made, their outcomes, the slowest and the 99th percentile, any
exception that escaped the engine (a crash), when the store was reported down and up, and
how long after Redis answered again the engine used it (recovery).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.decision_bench import SHIPPED
from benchmarks.echo_bench import free_port
from benchmarks.store_bench import PAYLOAD
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import BreakerGuard, Engine, conn_context, event_context
from policy_engine.state.redis_store import RedisStore

PHASES = [("healthy", 2.0), ("killed", 2.0), ("restarted", 3.0), ("hung", 5.0), ("resumed", 3.0)]


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)


def policy_text(mode: str) -> str:
    text = Path(SHIPPED).read_text(encoding="utf-8")
    text = text.replace("    mode: shadow              # watch before enforcing\n", "", 1)
    shipped = "  on_store_error: fail_open   # the shared store is down: let traffic through\n"
    assert shipped in text, "the shipped policy's on_store_error line changed"
    return text.replace(shipped, f"  on_store_error: {mode}\n", 1)


class Redis:
    def __init__(self, directory: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", self.directory]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        time.sleep(0.2)

    def signal(self, number: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, number)
        if number == signal.SIGKILL:
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)


async def run_mode(mode: str, tasks: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        redis = Redis(directory)
        redis.start()
        policy = compile_text(policy_text(mode), str(SHIPPED), base_dir=Path(SHIPPED).parent).policy
        engine = Engine(policy, RedisStore(redis.url), clock=time.time)
        changes: list[tuple[float, bool]] = []
        engine.store_health.listeners.append(
            lambda available, _: changes.append((time.monotonic(), available))
        )
        phases = [Phase(name) for name, _ in PHASES]
        current = [phases[0]]
        stop = asyncio.Event()

        async def connection(index: int) -> None:
            conn = conn_context(
                sid=f"s{index}", ip="192.0.2.1", user_id=f"u{index}", conversation_id="c"
            )
            while not stop.is_set():
                phase = current[0]
                started = time.perf_counter()
                try:
                    outcome = await decide(engine, conn)
                except Exception as exc:  # what must never happen
                    phase.crashes.append(repr(exc))
                    outcome = "crash"
                phase.latencies.append((time.perf_counter() - started) * 1e6)
                phase.outcomes[outcome] += 1
                await asyncio.sleep(0.005)

        workers = [asyncio.ensure_future(connection(i)) for i in range(tasks)]
        marks: dict[str, float] = {}
        for index, (name, seconds) in enumerate(PHASES):
            current[0] = phases[index]
            marks[name] = time.monotonic()
            if name == "killed":
                redis.signal(signal.SIGKILL)
            elif name == "restarted":
                redis.start()
            elif name == "hung":
                redis.signal(signal.SIGSTOP)
            elif name == "resumed":
                redis.signal(signal.SIGCONT)
            await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*workers)
        await engine.state.close()
        redis.stop()
    report(mode, phases, changes, marks)


async def decide(engine: Engine, conn: dict[str, Any]) -> str:
    event = event_context("oh_user_action", PAYLOAD, size_bytes=64, has_ack=True)
    decision = await engine.on_event(conn, {}, event)
    if not decision.allowed:
        return str((decision.payload or {}).get("code", decision.outcome.value))
    guard = await engine.before_call(conn, {}, event)
    if isinstance(guard, BreakerGuard):
        await engine.after_call(guard, conn, event, None, None)
        return "allow"
    return str((guard.payload or {}).get("code", "refused"))


def report(
    mode: str, phases: list[Phase], changes: list[tuple[float, bool]], marks: dict[str, float]
) -> None:
    print(f"on_store_error: {mode}")
    print(f"  {'phase':<10} {'decisions':>9} {'p99 us':>9} {'max us':>9}  outcomes")
    for phase in phases:
        values = sorted(phase.latencies) or [0.0]
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        outcomes = ", ".join(f"{k} {v}" for k, v in phase.outcomes.most_common())
        counts = f"{len(phase.latencies):>9} {p99:>9.0f} {values[-1]:>9.0f}"
        print(f"  {phase.name:<10} {counts}  {outcomes}")
        if phase.crashes:
            print(f"    crashes: {len(phase.crashes)} {phase.crashes[:2]}")
    for at, available in changes:
        print(f"  store {'up  ' if available else 'down'} at +{at - marks['healthy']:.2f} s")
    for name, answered_at in (("restarted", "restarted"), ("resumed", "resumed")):
        ups = [at for at, available in changes if available and at >= marks[answered_at]]
        if ups:
            print(f"  recovered {ups[0] - marks[name]:.2f} s after Redis was {name}")
    medians = [statistics.median(p.latencies) for p in phases if p.latencies]
    print(f"  median per phase (us): {', '.join(f'{m:.0f}' for m in medians)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["fail_open", "fail_closed", "local"])
    parser.add_argument("--tasks", type=int, default=20)
    args = parser.parse_args()
    for mode in args.modes:
        asyncio.run(run_mode(mode, args.tasks))


if __name__ == "__main__":
    main()
