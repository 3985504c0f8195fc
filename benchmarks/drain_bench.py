"""Stopping a server under load: bare python-socketio against ``policy-engine serve``'s drain.

Two server processes of one kind behind HAProxy (``deploy/haproxy.cfg``: sticky cookies,
``/readyz`` health checks every second). ``--clients`` plain socket.io-client connections
(``benchmarks/drain_clients.mjs``: default reconnection, WebSocket, one address each) are
opened while only the first process is up; then the second starts, and once HAProxy sees it
healthy the first gets SIGTERM. Reported per mode: how long the first took to exit (killed
after ``--limit`` seconds if it had not), how many clients were told ``SERVER_DRAINING``,
how many lost their connection, and how long from the signal until every one of them was
connected again (through HAProxy, so to the second process).

* ``serve``: ``policy-engine serve`` of the demo app under the shipped policy (its
  ``drain``: readiness fails, 2 s of grace, then 500 clients a second told and closed, 30 s
  deadline), the loopback trusted as a proxy so each client is its own address;
* ``bare``: the same demo app on python-socketio under uvicorn, as an application without
  the engine runs: SIGTERM is uvicorn's graceful shutdown, ``/readyz`` always answers 200.

    python -m benchmarks.drain_bench [--clients 2000] [--modes bare serve] [--limit 60]
                                     [--proxies 1]

``--proxies 2`` shares the clients among two HAProxy processes (and two client
processes): 10,000 clients need more descriptors than one process may hold here.

Needs ``haproxy`` and ``node`` on PATH and ``npm ci --prefix tests/js``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from benchmarks.echo_bench import ROOT, free_port

SHIPPED = ROOT / "policies" / "policies.yaml"
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"
CLIENTS = ROOT / "benchmarks" / "drain_clients.mjs"

BARE_APP = """
import asyncio, socketio, uvicorn
from policy_engine.server import demo

sio_app = socketio.ASGIApp(demo.create_server())

async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/readyz":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await sio_app(scope, receive, send)

uvicorn.run(app, host="127.0.0.1", port=int(PORT), ws="wsproto", log_level="error")
"""


def bench_policy(folder: Path) -> Path:
    """The shipped policy, believing the loopback's ``X-Forwarded-For``: each client names
    an address of its own, as behind a proxy."""
    document = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    document["identity"]["trusted_proxies"] = ["127.0.0.1/32"]
    # Beside the shipped file, whose key and schema paths are relative to its folder.
    path = SHIPPED.parent / f".drain-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def start(mode: str, port: int, policies: Path, log: Path) -> subprocess.Popen[bytes]:
    if mode == "bare":
        argv = [sys.executable, "-c", BARE_APP.replace("PORT", str(port))]
    else:
        argv = [sys.executable, "-m", "policy_engine", "serve", "--policies", str(policies)]
        argv += ["--port", str(port), "--ops-port", str(free_port()), "--log-level", "error"]
    with log.open("ab") as output:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    wait_ready(port, process)
    return process


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on {port} not ready")


@contextmanager
def haproxy(listen: int, first: int, second: int, folder: Path, index: int = 0) -> Iterator[Path]:
    binary = shutil.which("haproxy")
    if binary is None:
        raise SystemExit("haproxy is not on PATH")
    env = {
        **os.environ,
        "POLICY_ENGINE_LISTEN": f"127.0.0.1:{listen}",
        "POLICY_ENGINE_APP1": f"127.0.0.1:{first}",
        "POLICY_ENGINE_APP2": f"127.0.0.1:{second}",
    }
    log = folder / f"haproxy-{index}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [binary, "-f", str(HAPROXY_CONFIG), "-db"], env=env, stdout=output, stderr=output
        )
    try:
        time.sleep(1.0)
        yield log
    finally:
        process.terminate()
        process.wait(10)


def run(mode: str, clients: int, limit: float, policies: Path, proxies: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        folder = Path(directory)
        first_port, second_port = free_port(), free_port()
        first = start(mode, first_port, policies, folder / "first.log")
        second: subprocess.Popen[bytes] | None = None
        listens = [free_port() for _ in range(proxies)]
        for index, listen in enumerate(listens):
            stack.enter_context(haproxy(listen, first_port, second_port, folder, index))
        time.sleep(2.5)  # HAProxy marks the absent second process down
        shares = [clients // proxies + (1 if i < clients % proxies else 0) for i in range(proxies)]
        nodes = [
            subprocess.Popen(
                [
                    *("node", str(CLIENTS), f"http://127.0.0.1:{listen}"),
                    *(str(share), str(2 * limit + 10), str(sum(shares[:index]))),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for index, (listen, share) in enumerate(zip(listens, shares, strict=True))
        ]
        started = time.monotonic()  # the clients' `t` counts from about here
        lines: list[list[dict[str, Any]]] = [[] for _ in nodes]
        try:
            for node, seen in zip(nodes, lines, strict=True):
                assert node.stdout is not None
                for line in node.stdout:
                    seen.append(json.loads(line))
                    if seen[-1]["event"] == "all":
                        break
            second = start(mode, second_port, policies, folder / "second.log")
            time.sleep(2.0)  # HAProxy's next checks find it up
            signalled = time.monotonic()
            first.send_signal(signal.SIGTERM)
            try:
                first.wait(limit)
                exited: float | None = time.monotonic() - signalled
            except subprocess.TimeoutExpired:
                first.kill()
                first.wait()
                exited = None
            for node, seen in zip(nodes, lines, strict=True):
                assert node.stdout is not None
                seen.extend(json.loads(line) for line in node.stdout)
        finally:
            for node in nodes:
                node.kill()
                node.wait()
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
    signalled_ms = (signalled - started) * 1000
    totals = {"notices": 0, "disconnects": 0, "reconnects": 0, "connected": 0}
    backs: list[float | None] = []
    for seen in lines:
        summaries = [line for line in seen if line["event"] == "summary"]
        last = summaries[-1] if summaries else {}
        for field in totals:
            totals[field] += last.get(field, 0)
        back = next((line for line in seen if line["event"] == "back"), None)
        backs.append(None if back is None else (back["t"] - signalled_ms) / 1000)
    return {
        "mode": mode,
        "exited_s": exited,
        "told": totals["notices"],
        "lost": totals["disconnects"],
        "back": totals["reconnects"],
        "connected_at_end": totals["connected"],
        "all_back_s": None if None in backs else max(b for b in backs if b is not None),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--modes", nargs="+", default=["bare", "serve"])
    parser.add_argument("--limit", type=float, default=60.0)
    parser.add_argument(
        "--proxies",
        type=int,
        default=1,
        help="HAProxy processes (and client processes), the clients shared among them: "
        "one HAProxy holds two descriptors per client, and a process here may hold 20,000",
    )
    args = parser.parse_args()
    policies = bench_policy(ROOT)
    try:
        print(f"{args.clients} plain socket.io-client connections, then SIGTERM")
        for mode in args.modes:
            result = run(mode, args.clients, args.limit, policies, args.proxies)
            exited = result["exited_s"]
            back = result["all_back_s"]
            print(
                f"{mode:<6} exited {'not within limit' if exited is None else f'{exited:.1f} s'}"
                f"  told {result['told']}  lost {result['lost']}  back {result['back']}"
                f"  connected at end {result['connected_at_end']}"
                f"  all back {'never' if back is None else f'{back:.1f} s'} after the signal"
            )
    finally:
        policies.unlink()


if __name__ == "__main__":
    main()
