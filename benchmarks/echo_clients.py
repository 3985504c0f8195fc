"""Client side of the echo benchmark: real python-socketio clients over WebSocket.

    python -m benchmarks.echo_clients throughput --port P --clients N --seconds S
    python -m benchmarks.echo_clients idle --port P --clients N --hold S

Prints one JSON line (throughput) or "connected N" once every idle client is up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import socketio

from policy_engine.client import connect_with_policy


async def connect(port: int, index: int) -> socketio.AsyncClient:
    client = socketio.AsyncClient(reconnection=False)
    # Each client comes from its own address (RFC 2544's benchmark range), through the
    # loopback proxy the shipped policy trusts, as real users behind a load balancer do:
    # otherwise the per-IP connect limit would rightly refuse a crowd from one address.
    # A connect refused because the server is busy is retried when the server advises.
    address = f"198.18.{index // 250}.{index % 250 + 1}"
    await connect_with_policy(
        client,
        f"http://127.0.0.1:{port}?conversation_id=bench-{index % 100}",
        headers={"X-Forwarded-For": address},
        transports=["websocket"],
        wait_timeout=30,
    )
    return client


async def throughput(port: int, clients: int, seconds: float) -> None:
    connected = [await connect(port, i) for i in range(clients)]
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def loop(client: socketio.AsyncClient) -> int:
        count = 0
        while time.perf_counter() < stop:
            start = time.perf_counter()
            # An object the `every` mode's schema accepts (the schema of a user action).
            await client.call("echo", {"action": "echo", "args": {"n": count}}, timeout=30)
            latencies.append(time.perf_counter() - start)
            count += 1
        return count

    began = time.perf_counter()
    counts = await asyncio.gather(*(loop(c) for c in connected))
    elapsed = time.perf_counter() - began
    for client in connected:
        await client.disconnect()
    print_result(counts, elapsed, latencies)


def print_result(counts: list[int], elapsed: float, latencies: list[float]) -> None:
    """A client run's one JSON line: events, their rate, and the median and 99th percentile
    round trip (``latencies`` in seconds)."""
    latencies.sort()
    print(
        json.dumps(
            {
                "events": sum(counts),
                "events_per_second": sum(counts) / elapsed,
                "p50_us": latencies[len(latencies) // 2] * 1e6,
                "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
            }
        )
    )


async def idle(port: int, clients: int, hold: float) -> None:
    connected: list[socketio.AsyncClient] = []
    for start in range(0, clients, 50):
        batch = range(start, min(clients, start + 50))
        connected += await asyncio.gather(*(connect(port, i) for i in batch))
    await asyncio.sleep(1.0)
    print(f"connected {len(connected)}", flush=True)
    await asyncio.sleep(hold)
    await asyncio.gather(*(c.disconnect() for c in connected))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("throughput", "idle"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=3.0)
    args = parser.parse_args()
    if args.what == "throughput":
        asyncio.run(throughput(args.port, args.clients, args.seconds))
    else:
        asyncio.run(idle(args.port, args.clients, args.hold))


if __name__ == "__main__":
    main()
