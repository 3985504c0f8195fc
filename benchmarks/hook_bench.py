"""Server CPU per echo inside one process: python-socketio's own path, bare and with the policy.

The echo benchmark measures the real thing over loopback, but on a shared machine its runs
vary by several percent, more than the policy's cost it is meant to show. This one drives
the same server code without sockets or clients: each event enters where Engine.IO hands
a received message to python-socketio, goes through the event task, the handler and the
ack, and ends when the ack reaches the connection's outgoing queue. What it leaves out
(uvicorn, wsproto, the network) is identical in both modes, so the difference it shows is
the policy's, and it is steady enough to compare one change against another.

    python -m benchmarks.hook_bench [--events 20000] [--rounds 5] [--modes bare empty shipped]

``empty`` attaches the adapter under a policy with no rules; ``shipped`` under
``policies/policies.yaml``; ``full`` is what ``policy-engine serve`` installs (metrics and
logs too).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import time

import engineio
import socketio
from engineio.async_socket import AsyncSocket

from benchmarks.echo_server import SHIPPED, create_sio

EMPTY_POLICY = "version: 1\nidentity:\n  trusted_proxies: [127.0.0.1/32]\n"


def attach_mode(sio: socketio.AsyncServer, mode: str) -> None:
    if mode == "bare":
        return
    from policy_engine.adapter.attach import attach
    from policy_engine.compiler.pipeline import compile_file, compile_text
    from policy_engine.core.engine import Engine

    if mode == "full":
        from policy_engine.server.app import build_app

        build_app(sio, SHIPPED)
        return
    shipped = mode == "shipped"
    policy = compile_file(SHIPPED).policy if shipped else compile_text(EMPTY_POLICY).policy
    attach(sio, Engine(policy))


async def connected(mode: str) -> tuple[socketio.AsyncServer, AsyncSocket]:
    sio = create_sio()
    attach_mode(sio, mode)
    eio: engineio.AsyncServer = sio.eio
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
    return sio, socket


async def per_event(mode: str, events: int) -> float:
    """Seconds of one echo, from the received message to the ack in the outgoing queue."""
    sio, socket = await connected(mode)
    eio = sio.eio
    queue = socket.queue
    messages = [f'2{n}["echo",{n}]' for n in range(events)]
    gc.collect()
    started = time.perf_counter()
    for message in messages:
        await eio._trigger_event("message", "bench", message, run_async=False)
        await queue.get()
    return (time.perf_counter() - started) / events


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["bare", "empty", "shipped", "full"])
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    results: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for round_ in range(args.rounds):
        order = args.modes if round_ % 2 == 0 else list(reversed(args.modes))
        for mode in order:
            results[mode].append(asyncio.run(per_event(mode, args.events)))
    base = statistics.median(results[args.modes[0]])
    print(f"{'mode':<8} {'us/event':>9} {'added us':>9} {'capacity':>9}")
    for mode, runs in results.items():
        median = statistics.median(runs)
        print(f"{mode:<8} {median * 1e6:>9.2f} {(median - base) * 1e6:>9.2f} {base / median:>9.3f}")


if __name__ == "__main__":
    main()
