"""Echo round trips and idle-connection memory: bare python-socketio against the policy.

Each run starts the server pinned to core 0 and the clients pinned to core 1 (the
reference baseline's set-up), the two modes alternating, with the same client code:

    python -m benchmarks.echo_bench throughput [--clients 1 50] [--seconds 10] [--rounds 3]
        [--modes bare policy every]
    python -m benchmarks.echo_bench memory [--connections 1000 5000]
    python -m benchmarks.echo_bench inprocess --mode bare|policy|every [--events 2000]

``inprocess`` drives one server of that mode without sockets, as
:mod:`benchmarks.hook_bench` does (an Engine.IO message in, the ack in the connection's
outgoing queue), untimed, for an instruction counter: the difference between
``valgrind --tool=callgrind`` totals at ``--events N`` and at ``--events 0``, divided by
N, is the server's own instructions per echo, steady on a busy machine.

The modes are those of :mod:`benchmarks.echo_server`: ``policy`` the shipped policy (the
echo falls to ``"*"``), ``every`` the echo meeting every rule a user action meets. The
server's CPU per echo is read from ``/proc``. Targets: the shipped policy >= 0.95 of bare
throughput and p99 <= 1.10x at 50 clients; ``every`` >= 0.90 and p99 <= 1.15x; both
>= 0.95 at one client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core), *argv]
    return list(argv)


@contextmanager
def server(
    mode: str, *options: str, start_within: float = 20.0, module: str = "benchmarks.echo_server"
) -> Iterator[tuple[int, int]]:
    """An ``echo_server`` (or ``module``, taking the same arguments) on core 0 (``options``
    are more of its arguments): its port and pid once it listens; stopped with SIGINT on
    the way out."""
    port = free_port()
    argv = [sys.executable, "-m", module, "--mode", mode, "--port", str(port)]
    process = subprocess.Popen(
        pinned(0, [*argv, *options]), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + start_within
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{mode} server did not start")
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_clients(mode_args: list[str]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.echo_clients", *mode_args]
    result = subprocess.run(pinned(1, argv), cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def throughput(
    clients: Sequence[int],
    seconds: float,
    rounds: int,
    modes: Sequence[str],
    module: str = "benchmarks.echo_server",
) -> None:
    print(f"echo round trips, {seconds:g} s per run, {rounds} alternating rounds per mode")
    print(
        f"{'clients':>7} {'mode':<7} {'events/s':>10} {'p50 us':>8} {'p99 us':>8} "
        f"{'server CPU':>10} {'CPU us/event':>12}  rounds (events/s)"
    )
    for count in clients:
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for round_ in range(rounds):
            # Forward then backward (ABC CBA): a drift in machine speed during the run
            # weighs on every mode alike.
            for mode in modes if round_ % 2 == 0 else tuple(reversed(modes)):
                results[mode].append(measure(mode, count, seconds, module))
        summary = {}
        for mode, runs in results.items():
            rate = statistics.median(r["events_per_second"] for r in runs)
            p50 = statistics.median(r["p50_us"] for r in runs)
            p99 = statistics.median(r["p99_us"] for r in runs)
            busy = statistics.median(r["server_cpu"] for r in runs)
            per_event = statistics.median(r["cpu_us_per_event"] for r in runs)
            summary[mode] = (rate, p50, p99, per_event)
            spread = " / ".join(f"{r['events_per_second']:.0f}" for r in runs)
            print(
                f"{count:>7} {mode:<7} {rate:>10.0f} {p50:>8.0f} {p99:>8.0f} "
                f"{busy:>10.0%} {per_event:>12.1f}  {spread}"
            )
        bare = summary[modes[0]]
        for mode in modes[1:]:
            policy = summary[mode]
            print(
                f"{count:>7} {mode:<7} ratio throughput {policy[0] / bare[0]:.3f}  "
                f"p50 {policy[1] / bare[1]:.3f}x  p99 {policy[2] / bare[2]:.3f}x  "
                f"CPU per event {policy[3] - bare[3]:+.1f} us "
                f"(server capacity {bare[3] / policy[3]:.3f})"
            )
            # The same ratios round by round (each pair measured in the same round), whose
            # median is steadier than the ratio of medians when the machine's speed drifts.
            pairs = list(zip(results[modes[0]], results[mode], strict=True))
            throughput_ratios = [p["events_per_second"] / b["events_per_second"] for b, p in pairs]
            p99_ratios = [p["p99_us"] / b["p99_us"] for b, p in pairs]
            capacity_ratios = [b["cpu_us_per_event"] / p["cpu_us_per_event"] for b, p in pairs]
            print(
                f"{count:>7} {mode:<7} paired throughput "
                f"{statistics.median(throughput_ratios):.3f}  "
                f"p99 {statistics.median(p99_ratios):.3f}x  "
                f"server capacity {statistics.median(capacity_ratios):.3f}  "
                f"(rounds: {' '.join(f'{r:.3f}' for r in throughput_ratios)}; "
                f"p99 {' '.join(f'{r:.2f}' for r in p99_ratios)})"
            )


def measure(
    mode: str, clients: int, seconds: float, module: str = "benchmarks.echo_server"
) -> dict[str, Any]:
    """One timed run: the clients' counts plus the server's CPU use during it."""
    with server(mode, module=module) as (port, pid):
        args = ["--port", str(port), "--clients", str(clients), "--seconds", str(seconds)]
        cpu_before, began = cpu_seconds(pid), time.perf_counter()
        run = run_clients(["throughput", *args])
        cpu = cpu_seconds(pid) - cpu_before
        run["server_cpu"] = cpu / (time.perf_counter() - began)
        run["cpu_us_per_event"] = cpu / run["events"] * 1e6
        return run


def memory(connections: Sequence[int]) -> None:
    print(f"{'conns':>6} {'mode':<7} {'before MiB':>10} {'after MiB':>10} {'KiB/conn':>9}")
    for count in connections:
        per: dict[str, float] = {}
        for mode in ("bare", "policy"):
            with server(mode) as (port, pid):
                time.sleep(1.0)
                before = rss_kib(pid)
                args = ["--port", str(port), "--clients", str(count), "--hold", "3"]
                ready = subprocess.Popen(
                    pinned(1, [sys.executable, "-m", "benchmarks.echo_clients", "idle", *args]),
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                assert ready.stdout is not None
                line = ready.stdout.readline()  # "connected N" once all are up
                after = rss_kib(pid)
                ready.wait(120)
                if not line.startswith("connected "):
                    raise RuntimeError(f"{mode}: the idle clients could not all connect")
                connected = int(line.split()[1])
                per[mode] = (after - before) / max(1, connected)
                print(
                    f"{connected:>6} {mode:<7} {before / 1024:>10.1f} {after / 1024:>10.1f} "
                    f"{per[mode]:>9.1f}"
                )
        print(f"{count:>6} ratio   per-connection memory {per['policy'] / per['bare']:.2f}x")


async def inprocess(mode: str, events: int, directory: Path) -> None:
    """``events`` echoes through a ``mode`` server without sockets (after 500 to warm up)."""
    from engineio.async_socket import AsyncSocket

    from benchmarks.echo_server import create_sio, edited_policy
    from policy_engine.server.app import build_app

    sio = create_sio()
    if mode != "bare":
        path = edited_policy(mode, directory)
        # The shadow window stays out of reach at the harness's rate, some ten times the
        # wire's: at its most, ten thousand per window, so a tenth of a second.
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("limit: 10000/second", "limit: 10000/100ms"))
        build_app(sio, path)
    eio = sio.eio
    socket = AsyncSocket(eio, "bench")
    eio.sockets["bench"] = socket
    scope = {
        "type": "websocket",
        "client": ("127.0.0.1", 50000),
        "headers": [(b"x-forwarded-for", b"198.18.0.1")],
    }
    sio.environ["bench"] = {"QUERY_STRING": "conversation_id=bench", "asgi.scope": scope}
    await eio._trigger_event("message", "bench", "0", run_async=False)
    await socket.queue.get()  # the CONNECT answer
    for n in range(500 + events):
        message = f'2{n}["echo",{{"action":"echo","args":{{"n":{n}}}}}]'
        await eio._trigger_event("message", "bench", message, run_async=False)
        await socket.queue.get()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--clients", type=int, nargs="+", default=[1, 50])
    t.add_argument("--seconds", type=float, default=10.0)
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--modes", nargs="+", default=["bare", "policy", "every"])
    m = sub.add_parser("memory")
    m.add_argument("--connections", type=int, nargs="+", default=[1000, 5000])
    i = sub.add_parser("inprocess")
    i.add_argument("--mode", choices=("bare", "policy", "every"), required=True)
    i.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    if args.what == "inprocess":
        import asyncio
        import logging
        import tempfile

        logging.disable(logging.WARNING)
        with tempfile.TemporaryDirectory() as directory:
            asyncio.run(inprocess(args.mode, args.events, Path(directory)))
        return
    if args.what == "throughput":
        if args.modes[0] != "bare":
            parser.error("--modes: the first mode is the baseline and must be bare")
        throughput(args.clients, args.seconds, args.rounds, args.modes)
    else:
        memory(args.connections)


if __name__ == "__main__":
    main()
