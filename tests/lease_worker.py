"""A server process in miniature, for the tests that need real processes sharing counts.

Run as ``python lease_worker.py URL PREFIX CONNECTIONS LEASE_TTL MAX_TOTAL``: it holds its
own :class:`ConnectionLeases` (renewing it), prints ``ready``, and on a line from stdin
opens CONNECTIONS connections at once through a :class:`Pipeline` (many calls in flight,
in batches of 8) against ``max_total`` MAX_TOTAL. It prints ``admitted N`` and holds
them until stdin closes, then releases them all and exits; or until it is killed.
"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from policy_engine.state.protocol import ConnectionLimits
from policy_engine.state.redis_connections import ConnectionLeases
from policy_engine.state.redis_pipeline import Pipeline


async def main(url: str, prefix: str, connections: int, lease_ttl: float, max_total: int) -> None:
    client = Redis.from_url(url)
    leases = ConnectionLeases(client, prefix, lease_ttl=lease_ttl)
    pipeline = Pipeline(client, limit=8)
    renewals = asyncio.create_task(leases.run_renewals())
    await client.ping()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    async def open_one(number: int) -> bool:
        limits = ConnectionLimits(
            f"user-{number % 7}", f"10.0.0.{number % 5}", max_total, None, None
        )
        call, reached = leases.open(limits)
        return reached(await pipeline.run(call)) is None

    admitted = await asyncio.gather(*(open_one(number) for number in range(connections)))
    print("admitted", sum(admitted), flush=True)
    await asyncio.to_thread(sys.stdin.read)
    renewals.cancel()
    await leases.release_all()
    await client.aclose()


if __name__ == "__main__":
    url, prefix, connections, lease_ttl, max_total = sys.argv[1:]
    asyncio.run(main(url, prefix, int(connections), float(lease_ttl), int(max_total)))
