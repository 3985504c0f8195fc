"""Connection counts under leases, on a real redis-server (a free loopback port).

Each test has its own key prefix on one server for the module. Leases run out on Redis's
clock, so the tests that need one to run out give it a short ``lease_ttl`` and sleep past
it; what they check then holds whatever the machine's speed (a lease that has run out is
reaped by the next call). The tests with real processes run ``tests/lease_worker.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any
from uuid import uuid4

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer

from policy_engine.state.memory import MemoryStore
from policy_engine.state.protocol import ConnectionLimits
from policy_engine.state.redis_connections import ConnectionLeases
from policy_engine.state.redis_pipeline import Call

WAIT = 10.0  # a ceiling against hangs, never a measure of speed
WORKER = Path(__file__).resolve().parent / "lease_worker.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid4().hex}"


# -- helpers -------------------------------------------------------------------------------------


async def run(call: Call) -> Any:
    return await call.script(keys=call.keys, args=call.plain_args)


async def open_connection(
    leases: ConnectionLeases,
    user: str,
    ip: str,
    *,
    max_total: int | None = None,
    max_per_user: int | None = None,
    max_per_ip: int | None = None,
) -> str | None:
    call, reached = leases.open(ConnectionLimits(user, ip, max_total, max_per_user, max_per_ip))
    return reached(await run(call))


async def close_connection(leases: ConnectionLeases, user: str, ip: str) -> None:
    call, answer = leases.close(user, ip)
    answer(await run(call))


async def counters(client: Redis, prefix: str) -> dict[str, int]:
    """The shared counters under ``prefix``, by name (``total``, ``user:ann``, ...)."""
    base = f"{{{prefix}:conn}}:"
    found: dict[str, int] = {}
    async for key in client.scan_iter(match=f"{base}*"):
        name = key.decode()[len(base) :]
        if name.startswith(("total", "user:", "ip:")):
            found[name] = int(await client.get(key))
    return found


async def process_counts(client: Redis, prefix: str, leases: ConnectionLeases) -> dict[str, int]:
    raw = await client.hgetall(f"{{{prefix}:conn}}:proc:{leases.process_id}")
    return {field.decode(): int(value) for field, value in raw.items()}


# -- the ceilings, as the store enforces them today ----------------------------------------------


async def test_ceilings_close_and_cleanup(client: Redis, prefix: str) -> None:
    leases = ConnectionLeases(client, prefix)
    assert await open_connection(leases, "ann", "10.0.0.1", max_total=3, max_per_user=2) is None
    assert await open_connection(leases, "ann", "10.0.0.2", max_total=3, max_per_user=2) is None
    assert await open_connection(leases, "ann", "10.0.0.3", max_per_user=2) == "max_per_user"
    assert await open_connection(leases, "", "10.0.0.1", max_per_user=0, max_per_ip=2) is None
    assert await open_connection(leases, "bob", "10.0.0.1", max_per_ip=2) == "max_per_ip"
    assert await open_connection(leases, "bob", "10.0.0.3", max_total=3) == "max_total"
    expected = {"total": 3, "user:ann": 2, "ip:10.0.0.1": 2, "ip:10.0.0.2": 1}
    assert await counters(client, prefix) == expected  # no user: no per-user count
    assert await process_counts(client, prefix, leases) == expected

    await close_connection(leases, "ann", "10.0.0.1")
    expected = {"total": 2, "user:ann": 1, "ip:10.0.0.1": 1, "ip:10.0.0.2": 1}
    assert await counters(client, prefix) == expected
    await close_connection(leases, "ann", "10.0.0.2")
    await close_connection(leases, "", "10.0.0.1")
    assert await counters(client, prefix) == {}  # every counter deleted at zero
    assert await process_counts(client, prefix, leases) == {}
    await close_connection(leases, "ann", "10.0.0.1")  # one close too many takes nothing
    assert await counters(client, prefix) == {}


async def test_same_answers_as_the_memory_store(client: Redis, prefix: str) -> None:
    """A random run of opens and closes: every answer as the memory store's, and the
    global counters always the sum of what is open."""
    store = MemoryStore()
    leases = ConnectionLeases(client, prefix)
    choose = random.Random(7)
    open_now: list[tuple[str, str]] = []
    for _ in range(300):
        if open_now and choose.random() < 0.4:
            user, ip = open_now.pop(choose.randrange(len(open_now)))
            await store.close_connection(user, ip)
            await close_connection(leases, user, ip)
        else:
            limits = ConnectionLimits(
                choose.choice(["", "ann", "bob", "cy:1"]),
                choose.choice(["10.0.0.1", "10.0.0.2", "::1"]),
                choose.choice([None, 6, 9]),
                choose.choice([None, 2, 3]),
                choose.choice([None, 0, 4]),
            )
            expected = await store.open_connection(limits)
            call, reached = leases.open(limits)
            assert reached(await run(call)) == expected
            if expected is None:
                open_now.append((limits.user, limits.ip))
        counted = await counters(client, prefix)
        assert counted.get("total", 0) == len(open_now), counted
    assert await process_counts(client, prefix, leases) == await counters(client, prefix)


# -- leases that run out -------------------------------------------------------------------------


async def test_every_call_extends_the_lease(client: Redis, prefix: str) -> None:
    leases = ConnectionLeases(client, prefix)
    key = f"{{{prefix}:conn}}:leases"
    assert await open_connection(leases, "ann", "10.0.0.1") is None
    ends = [await client.zscore(key, leases.process_id)]
    calls = [leases.renew, lambda: close_connection(leases, "ann", "10.0.0.1"), leases.renew]
    for call in calls:
        await asyncio.sleep(0.01)  # Redis's clock moves on
        await call()
        ends.append(await client.zscore(key, leases.process_id))
    assert ends == sorted(set(ends)), ends  # each later than the one before


async def test_a_process_that_stops_renewing_stops_counting(client: Redis, prefix: str) -> None:
    live = ConnectionLeases(client, prefix)
    silent = ConnectionLeases(client, prefix, lease_ttl=1.0)
    assert await open_connection(silent, "ann", "10.0.0.1", max_total=2) is None
    assert await open_connection(silent, "bob", "10.0.0.2", max_total=2) is None
    assert await open_connection(live, "cy", "10.0.0.3", max_total=2) == "max_total"

    await asyncio.sleep(1.1)  # past the silent process's lease
    assert await open_connection(live, "cy", "10.0.0.3", max_total=2) is None
    assert await counters(client, prefix) == {"total": 1, "user:cy": 1, "ip:10.0.0.3": 1}
    assert await client.zrange(f"{{{prefix}:conn}}:leases", 0, -1) == [live.process_id.encode()]


async def test_a_late_close_never_takes_another_process_count(client: Redis, prefix: str) -> None:
    """Reaped, and its counts not kept: the late close of a connection changes nothing."""
    live = ConnectionLeases(client, prefix, keep_reaped=0)
    silent = ConnectionLeases(client, prefix, lease_ttl=0.2, keep_reaped=0)
    assert await open_connection(silent, "ann", "10.0.0.1") is None
    assert await open_connection(silent, "ann", "10.0.0.1") is None
    await asyncio.sleep(0.3)
    assert await open_connection(live, "ann", "10.0.0.1", max_per_user=1) is None
    assert not await client.exists(f"{{{prefix}:conn}}:proc:{silent.process_id}")

    await close_connection(silent, "ann", "10.0.0.1")
    await close_connection(silent, "ann", "10.0.0.1")
    assert await counters(client, prefix) == {"total": 1, "user:ann": 1, "ip:10.0.0.1": 1}
    assert await client.zscore(f"{{{prefix}:conn}}:leases", silent.process_id) is None


async def test_a_paused_process_that_closes_counts_again_exactly(
    client: Redis, prefix: str
) -> None:
    """Reaped while paused, its counts kept: its next call adds them back, less the close."""
    live = ConnectionLeases(client, prefix)
    paused = ConnectionLeases(client, prefix, lease_ttl=0.2)
    assert await open_connection(paused, "ann", "10.0.0.1") is None
    assert await open_connection(paused, "ann", "10.0.0.1") is None
    await asyncio.sleep(0.3)
    assert await open_connection(live, "bob", "10.0.0.2") is None
    assert await counters(client, prefix) == {"total": 1, "user:bob": 1, "ip:10.0.0.2": 1}

    await close_connection(paused, "ann", "10.0.0.1")
    assert await counters(client, prefix) == {
        "total": 2,
        "user:ann": 1,
        "ip:10.0.0.1": 1,
        "user:bob": 1,
        "ip:10.0.0.2": 1,
    }


async def test_a_renewal_after_its_lease_was_reaped_counts_its_connections_again(
    client: Redis, prefix: str
) -> None:
    live = ConnectionLeases(client, prefix, keep_reaped=60)  # the reaper's setting applies
    paused = ConnectionLeases(client, prefix, lease_ttl=0.2)
    hash_key = f"{{{prefix}:conn}}:proc:{paused.process_id}"
    for _ in range(3):
        assert await open_connection(paused, "ann", "10.0.0.1") is None
    await asyncio.sleep(0.3)
    assert await live.renew() is False  # reaps the paused process
    assert await counters(client, prefix) == {}
    assert 0 < await client.pttl(hash_key) <= 60_000  # kept for its return, not for ever
    assert await open_connection(live, "bob", "10.0.0.2", max_total=3) is None

    assert await paused.renew() is True
    assert await counters(client, prefix) == {
        "total": 4,
        "user:ann": 3,
        "ip:10.0.0.1": 3,
        "user:bob": 1,
        "ip:10.0.0.2": 1,
    }
    assert await client.pttl(hash_key) == -1
    assert await open_connection(live, "bob", "10.0.0.2", max_total=3) == "max_total"
    assert await paused.renew() is False
    for _ in range(3):
        await close_connection(paused, "ann", "10.0.0.1")
    assert await counters(client, prefix) == {"total": 1, "user:bob": 1, "ip:10.0.0.2": 1}


async def test_one_call_reaps_a_bounded_number_of_processes(client: Redis, prefix: str) -> None:
    dead = [ConnectionLeases(client, prefix, lease_ttl=0.2) for _ in range(20)]
    for leases in dead:
        assert await open_connection(leases, "", "10.0.0.1") is None
    await asyncio.sleep(0.3)
    live = ConnectionLeases(client, prefix)
    await live.renew()
    assert await counters(client, prefix) == {"total": 4, "ip:10.0.0.1": 4}
    await live.renew()
    assert await counters(client, prefix) == {}


async def test_renewals_hold_the_lease_until_cancelled(client: Redis, prefix: str) -> None:
    renewed = ConnectionLeases(client, prefix, lease_ttl=0.6)
    other = ConnectionLeases(client, prefix)
    assert await open_connection(renewed, "ann", "10.0.0.1") is None
    renewals = asyncio.create_task(renewed.run_renewals())
    await asyncio.sleep(1.0)  # past one lease: only the renewals kept it
    await other.renew()
    assert await counters(client, prefix) == {"total": 1, "user:ann": 1, "ip:10.0.0.1": 1}

    renewals.cancel()
    with pytest.raises(asyncio.CancelledError):
        await renewals
    await asyncio.sleep(0.7)
    await other.renew()
    assert await counters(client, prefix) == {}


async def test_release_all_at_shutdown(client: Redis, prefix: str) -> None:
    leaving = ConnectionLeases(client, prefix)
    staying = ConnectionLeases(client, prefix)
    assert await open_connection(leaving, "ann", "10.0.0.1") is None
    assert await open_connection(leaving, "bob", "10.0.0.1") is None
    assert await open_connection(staying, "ann", "10.0.0.1") is None

    await leaving.release_all()
    assert await counters(client, prefix) == {"total": 1, "user:ann": 1, "ip:10.0.0.1": 1}
    await close_connection(leaving, "ann", "10.0.0.1")  # closed during shutdown: nothing
    assert await counters(client, prefix) == {"total": 1, "user:ann": 1, "ip:10.0.0.1": 1}
    assert await client.zrange(f"{{{prefix}:conn}}:leases", 0, -1) == [staying.process_id.encode()]
    assert not await client.exists(f"{{{prefix}:conn}}:proc:{leaving.process_id}")


# -- real processes ------------------------------------------------------------------------------


def start_worker(
    server: RedisServer, prefix: str, connections: int, lease_ttl: float, max_total: int
) -> subprocess.Popen[str]:
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    command = [sys.executable, str(WORKER), server.url, prefix]
    command += [str(connections), str(lease_ttl), str(max_total)]
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def expect_line(stream: IO[str] | None, start: str) -> str:
    assert stream is not None
    line = stream.readline()
    assert line.startswith(start), f"worker said {line!r}"
    return line


def tell(worker: subprocess.Popen[str], line: str) -> None:
    assert worker.stdin is not None
    worker.stdin.write(line)
    worker.stdin.flush()


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes, killed at the end of the test if they are still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for worker in started:
        if worker.poll() is None:
            worker.kill()
        worker.wait(WAIT)
        for stream in (worker.stdin, worker.stdout):
            if stream is not None:
                stream.close()


async def test_a_killed_process_stops_counting_after_its_lease(
    client: Redis,
    redis_server: RedisServer,
    prefix: str,
    workers: list[subprocess.Popen[str]],
) -> None:
    worker = start_worker(redis_server, prefix, connections=5, lease_ttl=1.0, max_total=100)
    workers.append(worker)
    expect_line(worker.stdout, "ready")
    tell(worker, "go\n")
    assert expect_line(worker.stdout, "admitted") == "admitted 5\n"
    assert (await counters(client, prefix))["total"] == 5

    worker.send_signal(signal.SIGKILL)
    worker.wait(WAIT)
    await asyncio.sleep(1.2)  # past its lease, however recently it renewed
    await ConnectionLeases(client, prefix).renew()
    assert await counters(client, prefix) == {}


async def test_exactly_the_ceiling_is_admitted_under_contention(
    client: Redis,
    redis_server: RedisServer,
    prefix: str,
    workers: list[subprocess.Popen[str]],
) -> None:
    """Four processes, 60 opens each in flight at once, against max_total 100."""
    for _ in range(4):
        workers.append(start_worker(redis_server, prefix, 60, lease_ttl=30.0, max_total=100))
    for worker in workers:
        expect_line(worker.stdout, "ready")
    for worker in workers:
        tell(worker, "go\n")
    admitted = [int(expect_line(worker.stdout, "admitted").split()[1]) for worker in workers]
    assert sum(admitted) == 100
    assert (await counters(client, prefix))["total"] == 100
    hashes = [key async for key in client.scan_iter(match=f"{{{prefix}:conn}}:proc:*")]
    shares = sorted([int(await client.hget(key, "total") or 0) for key in hashes])
    assert shares == sorted(share for share in admitted if share)

    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.close()
    for worker in workers:
        assert worker.wait(WAIT) == 0
    assert await counters(client, prefix) == {}
