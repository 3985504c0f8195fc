"""Echo round trips on Flask-SocketIO: bare against the policy attached to its server.

Flask-SocketIO in threading mode, served as ``SocketIO.run`` serves it (werkzeug's threaded
server, WebSockets through simple-websocket), pinned to core 0, the clients (the echo
benchmark's, python-socketio over WebSocket) pinned to core 1, the modes alternating in
every round (``echo_bench``'s driver, which prints medians, the spread of the rounds and
the ratios paired round by round):

    python -m benchmarks.flask_echo_bench [--clients 1 50] [--seconds 10] [--rounds 3]
        [--modes bare policy every]

``policy`` attaches the shipped policy to ``socketio.server`` with the metrics and log
observers ``serve`` uses (the echo falls to ``"*"``); ``every`` makes the echo meet every
rule a user action meets (``echo_server``'s edits). Targets: >= 0.90 of bare throughput,
p99 <= 1.15x. The server side of a run is this module too:

    python -m benchmarks.flask_echo_bench --mode bare|policy|every --port PORT

and so is what one decision costs from a thread, either way the sync server can reach the
engine (``adapter/threads.py``): the shipped policy's work for one ``oh_user_action``
(its verdict and its breaker's outcome), called directly as the async hook does, inline
under the runner's lock, and through the runner's loop thread:

    python -m benchmarks.flask_echo_bench --decisions [--events 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.echo_bench import throughput
from benchmarks.echo_server import EDITS, edited_policy

MODULE = "benchmarks.flask_echo_bench"


def create_app(mode: str, directory: Path) -> Any:
    from flask import Flask
    from flask_socketio import SocketIO

    app = Flask(__name__)
    ext = SocketIO(app, async_mode="threading", logger=False, engineio_logger=False)

    @ext.on("connect")
    def connect(auth: Any) -> None:
        return None

    @ext.on("echo")
    def echo(data: Any) -> Any:
        return data

    if mode != "bare":
        from prometheus_client import CollectorRegistry

        from policy_engine import Engine, attach, compile_file
        from policy_engine.observe.composite import CompositeObserver
        from policy_engine.observe.logs import LogObserver, configure_logging
        from policy_engine.observe.metrics import MetricsObserver

        configure_logging("json")  # as `policy-engine serve` does by default
        engine = Engine(compile_file(edited_policy(mode, directory)).policy)
        metrics = MetricsObserver(CollectorRegistry(), process_metrics=True)
        attach(ext.server, engine, observer=CompositeObserver(metrics, LogObserver()))
    return app


def serve(mode: str, port: int) -> None:
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log(self, type: str, message: str, *args: Any) -> None:  # noqa: ARG002
            return None

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as directory:
        app = create_app(mode, Path(directory))
        server = make_server("127.0.0.1", port, app, threaded=True, request_handler=Quiet)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


def decisions(events: int) -> None:
    import statistics
    import time

    from benchmarks.decision_bench import SHIPPED, SteppingClock
    from policy_engine.adapter.threads import EngineRunner, run_inline
    from policy_engine.compiler.pipeline import compile_file
    from policy_engine.core.engine import BreakerGuard, Engine, conn_context, event_context

    clock = SteppingClock()
    engine = Engine(compile_file(SHIPPED).policy, clock=clock)
    runner = EngineRunner(engine)
    conn = conn_context(sid="s1", ip="192.0.2.1", user_id="alice", conversation_id="c1")
    claims = {"sub": "alice", "role": "editor"}
    run_inline(engine.on_connect(conn, claims))
    payload = {"action": "run", "args": {"command": "ls"}}

    def decide() -> None:
        event = event_context("oh_user_action", payload, size_bytes=64, has_ack=True)
        verdict = engine.judge_event_now(conn, claims, event)
        guard = getattr(verdict, "guard", None)
        if isinstance(guard, BreakerGuard) and guard.permits:
            run_inline(engine.after_call(guard, conn, event, None, None))

    async def on_loop() -> None:
        decide()

    def locked() -> None:
        with runner.lock:
            decide()

    ways = {
        "direct": decide,
        "inline": locked,
        "loop thread": lambda: runner.on_loop(on_loop()),
    }
    print(f"one oh_user_action decision from a thread, {events} events, shipped policy, memory")
    print(f"{'way':<12} {'median us':>9} {'p99 us':>8}")
    for name, call in ways.items():
        samples = []
        for _ in range(events):
            clock.now += 0.03
            start = time.perf_counter_ns()
            call()
            samples.append((time.perf_counter_ns() - start) / 1000)
        samples.sort()
        p99 = samples[int(len(samples) * 0.99)]
        print(f"{name:<12} {statistics.median(samples):>9.1f} {p99:>8.1f}")
    runner.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("bare", *EDITS), help="run one server (a run's)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["bare", "policy", "every"])
    parser.add_argument("--decisions", action="store_true", help="what one decision costs")
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    if args.decisions:
        decisions(args.events)
        return
    if args.mode is not None:
        if args.port is None:
            parser.error("--mode needs --port")
        serve(args.mode, args.port)
        return
    if args.modes[0] != "bare":
        parser.error("--modes: the first mode is the baseline and must be bare")
    print("Flask-SocketIO, threading mode (werkzeug, simple-websocket)", file=sys.stdout)
    throughput(args.clients, args.seconds, args.rounds, args.modes, MODULE)


if __name__ == "__main__":
    main()
