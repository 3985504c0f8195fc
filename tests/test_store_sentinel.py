"""The Redis store behind Sentinel: a real master, its replica and one Sentinel (see
``redis_server.py``), the store given only the Sentinel's ``redis+sentinel://`` URL.

The store finds the master through the Sentinel and works on it; after ``SENTINEL
FAILOVER`` promotes the replica, the calls made during the switch may fail (and follow
``on_store_error``), and then the same store decides again, on the new master, with the
state that was replicated to it, without a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from uuid import uuid4

import pytest
from redis_server import SentinelServers
from test_store import every_call, rate_limit

from policy_engine.language.model import StoreFailureMode
from policy_engine.server.app import open_store
from policy_engine.state.guarded import GuardedStore, store_refused
from policy_engine.state.redis_store import RedisStore

WAIT = 10.0  # a ceiling against hangs, never a measure of speed


@pytest.fixture
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    """Servers of one test alone: a failover changes them for good."""
    with SentinelServers(tmp_path_factory.mktemp("sentinel")).running() as servers:
        yield servers


async def test_the_store_works_on_the_master_the_sentinel_names(
    sentinel: SentinelServers,
) -> None:
    store = open_store(sentinel.url)
    assert isinstance(store, RedisStore)
    try:
        for call in every_call(store, time.time()):
            await asyncio.wait_for(call(), WAIT)
        with sentinel.master.client() as master:
            assert master.get(f"{{{store.prefix}:replay}}:id:c1") == b"1"
    finally:
        await store.close()


async def test_after_a_failover_the_same_store_decides_again_on_the_new_master(
    sentinel: SentinelServers,
) -> None:
    store = RedisStore(sentinel.url, prefix=f"test-{uuid4().hex}")
    state = GuardedStore(store)
    state.configure(timeout=2.0, on_error=StoreFailureMode.FAIL_CLOSED)
    checks = [(rate_limit("three 3/hour gcra 3"), "ip1")]
    try:
        for _ in range(2):
            decision = await state.rates(checks, time.time())
            assert decision.allowed
        old_master = sentinel.master.port
        await asyncio.to_thread(sentinel.failover)
        assert sentinel.master.port != old_master

        # The first calls may meet the old master, now a replica, and fail: fail_closed
        # refuses them, and says the store refused. Then the store finds the new one.
        deadline = time.monotonic() + WAIT
        decision = await state.rates(checks, time.time())
        while store_refused(decision):
            assert time.monotonic() < deadline, "the store never found the new master"
            await asyncio.sleep(0.05)
            decision = await state.rates(checks, time.time())

        assert decision.allowed  # the third of three: the two before were replicated
        refused = await state.rates(checks, time.time())
        assert not refused.allowed
        assert not store_refused(refused)  # refused by the limit, on the new master
        assert state.health.available
        for call in every_call(store, time.time()):
            await asyncio.wait_for(call(), WAIT)
    finally:
        await state.close()
