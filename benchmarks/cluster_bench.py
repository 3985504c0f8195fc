"""Two ``policy-engine serve`` processes sharing Redis, against the same two on memory.

Each run starts two real ``serve`` processes of the demo app and two client processes, one
in front of each, whose python-socketio clients (WebSocket) send ``oh_user_action`` and
wait for its ack, round trip after round trip, each client in a conversation of its own
(its ``oh_event`` comes back to it too). The two modes:

* ``redis``: ``--store`` a Redis the benchmark starts (emptied before each run), so the
  processes share limits, breakers and replay buffers and relay every emit through the
  Redis client manager ``serve`` installs;
* ``memory``: each process its own state, emits reaching its own clients only;
* ``redis-state`` (only when asked for with ``--modes``): the Redis store with
  ``--no-redis-manager``, to tell what sharing the state costs from what relaying costs.

The policy is the shipped one, made to refuse nothing so that both modes do the same work:
the per-conversation limit enforced, global, and too high to reach; the per-connection
limit too high to reach; X-Forwarded-For believed from loopback, each client naming its
own address (as behind the HAProxy of deploy/), so per-address connect limits do not
refuse a crowd from one machine. The modes alternate (their order reversed every other
round) for ``--rounds`` runs each; the report gives each mode's median and, per round,
its throughput over memory's, measured back to back.

    python -m benchmarks.cluster_bench [--clients 10] [--seconds 8] [--rounds 4]
                                       [--modes memory redis redis-state]
                                       [--store-query pipeline_window=0.0005]

Needs ``redis-server`` on PATH. ``--clients`` is per process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import socketio

from benchmarks.echo_bench import cpu_seconds, free_port
from benchmarks.echo_clients import print_result

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policies"
PAYLOAD = {"action": "message", "args": {"text": "hello"}}
MODES = ("memory", "redis", "redis-state")

# The shipped policy's lines, and what they become here: every one must be found.
EDITS = {
    "  trusted_proxies: []": "  trusted_proxies: [127.0.0.1/32]",
    # user-actions-per-connection (scope: local): never reached.
    "    limit: 50/second\n    burst: 50\n": "    limit: 1000000/second\n    burst: 1000000\n",
    # user-actions-per-conversation: enforced, global, never reached. A sliding window keeps
    # one timestamp per event in it (at most 10,000): a one-second window holds about as
    # many as the shipped 600/minute at its limit.
    "    limit: 600/minute\n    algorithm: sliding_window\n"
    "    mode: shadow              # watch before enforcing\n": (
        "    limit: 10000/second\n    algorithm: sliding_window\n    scope: global\n"
    ),
}


def bench_policy(directory: Path) -> Path:
    """The shipped policy, edited as the module says, beside copies of its keys and schemas."""
    text = (SHIPPED / "policies.yaml").read_text(encoding="utf-8")
    for old, new in EDITS.items():
        if old not in text:
            raise SystemExit(f"the shipped policy no longer has {old!r}: update EDITS")
        text = text.replace(old, new)
    for folder in ("keys", "events"):
        shutil.copytree(SHIPPED / folder, directory / folder)
    path = directory / "policies.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# -- processes -------------------------------------------------------------------------------


@contextmanager
def redis_server(directory: Path) -> Iterator[tuple[str, int, int]]:
    """A redis-server on a free loopback port: its URL, port and pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(directory)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: redis_command(port, b"PING") == b"+PONG", "redis-server")
        yield f"redis://127.0.0.1:{port}/0", port, process.pid
    finally:
        process.terminate()
        process.wait(10)


def redis_command(port: int, command: bytes) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(command + b"\r\n")
            return sock.recv(64).strip()
    except OSError:
        return b""


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_for(check: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


@contextmanager
def serving(
    policy: Path, store: str, options: list[str], directory: Path
) -> Iterator[list[tuple[int, int]]]:
    """Two ``serve`` processes on ``store``: each one's port and pid."""
    ports = [free_port(), free_port()]
    processes = []
    for index, port in enumerate(ports):
        argv = [sys.executable, "-m", "policy_engine.cli.main", "serve"]
        argv += ["--policies", str(policy), "--store", store, "--port", str(port)]
        argv += ["--log-format", "json", "--log-level", "warning", "--graceful-timeout", "2"]
        argv += options
        with (directory / f"serve-{index}.log").open("ab") as log:
            processes.append(subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log))
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_for(lambda p=port, s=process: ready(p) or s.poll() is not None, "serve")
            if process.poll() is not None:
                logs = [path.read_text() for path in sorted(directory.glob("serve-*.log"))]
                raise RuntimeError("serve exited:\n" + "\n".join(logs))
        yield [(port, process.pid) for port, process in zip(ports, processes, strict=True)]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


# -- one run ---------------------------------------------------------------------------------


def measure(
    mode: str,
    redis: tuple[str, int, int],
    *,
    policy: Path,
    clients: int,
    seconds: float,
    work: Path,
    store_query: str = "",
) -> dict[str, Any]:
    """One run: the clients' counts and latencies, the CPU the servers (and Redis) spent."""
    url, redis_port, redis_pid = redis
    if store_query:
        url = f"{url}?{store_query}"
    on_redis = mode != "memory"
    if on_redis:
        redis_command(redis_port, b"FLUSHALL")
    options = ["--no-redis-manager"] if mode == "redis-state" else []
    with serving(policy, url if on_redis else "memory", options, work) as servers:
        argv = [sys.executable, "-m", "benchmarks.cluster_bench", "clients"]
        argv += ["--clients", str(clients), "--seconds", str(seconds)]
        pids = [pid for _, pid in servers]
        cpu_before = [cpu_seconds(pid) for pid in [*pids, redis_pid]]
        runners = [
            subprocess.Popen(
                [*argv, "--port", str(port), "--first", str(index * clients)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            for index, (port, _) in enumerate(servers)
        ]
        outputs = [runner.communicate(timeout=seconds + 120)[0] for runner in runners]
        cpu = [
            cpu_seconds(pid) - before
            for pid, before in zip([*pids, redis_pid], cpu_before, strict=True)
        ]
    if any(runner.returncode for runner in runners):
        raise RuntimeError(f"a client process failed: {outputs}")
    runs = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    events = sum(run["events"] for run in runs)
    return {
        "events_per_second": sum(run["events_per_second"] for run in runs),
        "p50_us": statistics.median(run["p50_us"] for run in runs),
        "p99_us": max(run["p99_us"] for run in runs),
        "serve_cpu_us_per_event": sum(cpu[:2]) / events * 1e6,
        "redis_cpu_us_per_event": (cpu[2] / events * 1e6) if on_redis else 0.0,
    }


def report(
    clients: int, seconds: float, rounds: int, modes: list[str], store_query: str = ""
) -> None:
    print(
        f"2 serve processes, {clients} clients each, {seconds:g} s per run, "
        f"{rounds} runs per mode, load average {os.getloadavg()[0]:.2f}"
        + (f", store options {store_query}" if store_query else "")
    )
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        policy = bench_policy(work)
        with redis_server(work) as redis:
            for round_ in range(rounds):
                # ABBA: a drift in the machine's speed weighs on every mode alike.
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    run = measure(
                        mode,
                        redis,
                        policy=policy,
                        clients=clients,
                        seconds=seconds,
                        work=work,
                        store_query=store_query,
                    )
                    results[mode].append(run)
                    print(
                        f"  run {round_ + 1} {mode:<11} {run['events_per_second']:>7.0f} events/s"
                        f"  p50 {run['p50_us']:>6.0f} us  p99 {run['p99_us']:>7.0f} us"
                        f"  serve CPU {run['serve_cpu_us_per_event']:>5.0f} us/event"
                        f"  redis CPU {run['redis_cpu_us_per_event']:>4.0f} us/event",
                        flush=True,
                    )
    print(f"{'mode':<11} {'events/s':>9} {'p50 us':>7} {'p99 us':>8} {'serve CPU us/event':>19}")
    for mode, runs in results.items():
        print(
            f"{mode:<11} {statistics.median(r['events_per_second'] for r in runs):>9.0f}"
            f" {statistics.median(r['p50_us'] for r in runs):>7.0f}"
            f" {statistics.median(r['p99_us'] for r in runs):>8.0f}"
            f" {statistics.median(r['serve_cpu_us_per_event'] for r in runs):>19.0f}"
        )
    for mode in modes:
        if mode == "memory" or "memory" not in results:
            continue
        ratios = [
            shared["events_per_second"] / alone["events_per_second"]
            for alone, shared in zip(results["memory"], results[mode], strict=True)
        ]
        print(
            f"throughput {mode} / memory: median {statistics.median(ratios):.3f},"
            f" spread {min(ratios):.3f}-{max(ratios):.3f}"
            f" (rounds: {' '.join(f'{r:.3f}' for r in ratios)})"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


# -- the client process ----------------------------------------------------------------------


async def run_clients(port: int, clients: int, first: int, seconds: float) -> None:
    async def connect(index: int) -> Any:
        client = socketio.AsyncClient(reconnection=False)
        number = first + index
        # Its own address, through the loopback "proxy" the bench policy trusts.
        address = f"198.18.{number // 250}.{number % 250 + 1}"
        await client.connect(
            f"http://127.0.0.1:{port}?conversation_id=bench-{number}",
            headers={"X-Forwarded-For": address},
            transports=["websocket"],
            wait_timeout=30,
        )
        return client

    connected = [await connect(index) for index in range(clients)]
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def loop(client: Any) -> int:
        count = 0
        while time.perf_counter() < stop:
            began = time.perf_counter()
            ack = await client.call("oh_user_action", PAYLOAD, timeout=30)
            latencies.append(time.perf_counter() - began)
            if not (isinstance(ack, dict) and ack.get("ok")):
                raise RuntimeError(f"refused, so the modes would not do the same work: {ack}")
            count += 1
        return count

    began = time.perf_counter()
    counts = await asyncio.gather(*(loop(client) for client in connected))
    elapsed = time.perf_counter() - began
    for client in connected:
        with suppress(Exception):
            await client.disconnect()
    print_result(counts, elapsed, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", choices=("report", "clients"), default="report")
    parser.add_argument("--clients", type=int, default=10, help="clients per serve process")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4, help="runs per mode")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=["memory", "redis"], help="modes to compare"
    )
    parser.add_argument(
        "--store-query",
        default="",
        help="options for the Redis store's URL, e.g. pipeline_window=0.0005",
    )
    parser.add_argument("--port", type=int, help="(clients) the serve process to talk to")
    parser.add_argument("--first", type=int, default=0, help="(clients) first client number")
    args = parser.parse_args()
    if args.role == "clients":
        asyncio.run(run_clients(args.port, args.clients, args.first, args.seconds))
    else:
        report(args.clients, args.seconds, args.rounds, args.modes, args.store_query)


if __name__ == "__main__":
    main()
