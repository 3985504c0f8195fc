"""A reconnect storm: N socket.io-client connections, the server restarted under them.

Each round runs every mode once, in alternating order (ABC, CBA, ...): a server on a free
port, pinned to core 0 (``echo_server``: bare python-socketio, or the same handlers behind
the policy); N Node socket.io-client connections (tests/js/storm.mjs: default reconnection
settings, no helper) on core 1 connect; once all are in, the server is killed (SIGKILL, a
crash) and started again on the same port, and the clock runs until every client is back.
Reported per mode: how many came back within ``--limit`` seconds, and the time until the
last one did, from the kill; and per round the ratio of each mode's time to bare's time in
that same round.

    python -m benchmarks.storm_bench [--clients 500] [--rounds 3] [--limit 60]

Modes: ``bare``; ``policy`` (the shipped policy); ``queue`` (the shipped policy with an
admission queue: ``connections.queue: {max_wait: 10s, max_length: 5000}``); ``helper``
(the shipped policy, every client made by the JS helper's ``connectWithPolicy``, which
follows the server's advice; ``--modes bare,policy,helper``). Every client
sends ``X-Forwarded-For`` with an address of its own and both policies trust the loopback
as a proxy, so per-address limits apply per client as they would behind a proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from benchmarks.echo_bench import ROOT, free_port, pinned

SHIPPED = ROOT / "policies" / "policies.yaml"
STORM = ROOT / "tests" / "js" / "storm.mjs"


def bench_policy(folder: Path, mode: str) -> Path:
    """The shipped policy, believing the loopback's ``X-Forwarded-For`` (each client names
    an address of its own, as behind a proxy); ``queue`` adds the admission queue."""
    document = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    document["identity"]["trusted_proxies"] = ["127.0.0.1/32"]
    if mode == "queue":
        document["connections"]["queue"] = {"max_wait": "10s", "max_length": 5000}
    # Beside the shipped file, whose key and schema paths are relative to its folder.
    path = SHIPPED.parent / f".storm-{os.getpid()}-{mode}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def server_argv(mode: str, port: int, folder: Path) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.echo_server", "--port", str(port)]
    if mode == "bare":
        return [*argv, "--mode", "bare"]
    policy = bench_policy(folder, "policy" if mode == "helper" else mode)
    return [*argv, "--mode", "policy", "--policies", str(policy)]


def start_server(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        pinned(0, argv), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start") from None
            time.sleep(0.05)


@contextmanager
def clients(
    url: str, count: int, transports: str, kind: str = "plain"
) -> Iterator[queue.Queue[dict[str, Any]]]:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not on PATH")
    argv = pinned(1, [node, str(STORM), url, str(count), transports, kind])
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        yield lines
    finally:
        process.kill()
        process.wait()


def wait_for(lines: queue.Queue[dict[str, Any]], event: str, limit: float) -> dict[str, Any]:
    """The next ``event`` line, or the last count seen when ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    last: dict[str, Any] = {"event": "timeout", "connected": 0}
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line["event"] == event:
            return line
        if line["event"] == "count":
            last = {"event": "timeout", "connected": line["connected"]}
    return last


def storm(mode: str, count: int, limit: float, transports: str, folder: Path) -> dict[str, Any]:
    """One restart under ``count`` clients: (clients back, seconds until the last was)."""
    port = free_port()
    argv = server_argv(mode, port, folder)
    process = start_server(argv, port)
    try:
        kind = "helper" if mode == "helper" else "plain"
        with clients(f"http://127.0.0.1:{port}", count, transports, kind) as lines:
            first = wait_for(lines, "all", limit)
            if first["event"] != "all":
                raise RuntimeError(f"{mode}: only {first['connected']} connected at first")
            killed = time.monotonic()
            process.send_signal(signal.SIGKILL)
            process.wait()
            process = start_server(argv, port)
            back = wait_for(lines, "all", limit)
            seconds = time.monotonic() - killed
            if back["event"] == "all":
                return {"back": count, "seconds": seconds}
            return {"back": back["connected"], "seconds": None}
    finally:
        process.kill()
        process.wait()


@contextmanager
def removing(folder: Path, pattern: str) -> Iterator[None]:
    try:
        yield
    finally:
        for path in folder.glob(pattern):
            if f"-{os.getpid()}-" in path.name:
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=float, default=60.0)
    parser.add_argument("--transports", default="websocket")
    parser.add_argument("--modes", default="bare,policy,queue")
    args = parser.parse_args()
    modes = args.modes.split(",")
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    ratios: dict[str, list[float]] = {mode: [] for mode in modes if mode != "bare"}
    with tempfile.TemporaryDirectory() as folder, removing(SHIPPED.parent, ".storm-*.yaml"):
        for round_ in range(args.rounds):
            order = modes if round_ % 2 == 0 else modes[::-1]
            measured: dict[str, dict[str, Any]] = {}
            for mode in order:
                measured[mode] = storm(
                    mode, args.clients, args.limit, args.transports, Path(folder)
                )
                results[mode].append(measured[mode])
                print(f"round {round_ + 1} {mode}: {measured[mode]}", flush=True)
            bare = measured.get("bare", {}).get("seconds")
            for mode, values in ratios.items():
                seconds = measured[mode]["seconds"]
                if bare and seconds:
                    values.append(seconds / bare)
    print(
        f"\n{args.clients} clients ({args.transports}), {args.rounds} rounds, limit {args.limit}s"
    )
    for mode in modes:
        runs = results[mode]
        times = [r["seconds"] for r in runs if r["seconds"] is not None]
        back = [r["back"] for r in runs]
        spread = f"{min(times):.2f}-{max(times):.2f} s" if times else "never all back"
        print(f"{mode:>7}: back {back}, all back after {spread}")
    for mode, values in ratios.items():
        if values:
            text = ", ".join(f"{v:.2f}" for v in values)
            print(f"{mode:>7} / bare: {text} (median {statistics.median(values):.2f})")


if __name__ == "__main__":
    main()
