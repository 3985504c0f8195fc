"""The Redis store on a real Redis Cluster of three masters (see ``redis_server.py``).

The shared suite of ``test_store.py`` runs here again, every test on a store backed by the
cluster (each under its own key prefix); then what only a cluster has: the limits of one
event in several slots, judged as the memory store judges them; keys a client chose with
braces in them; batches split by node; a node that stops and comes back; and four
processes contending on one key, the limit exact.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import test_store
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis_server import ClusterServers, wait_for
from store_contention import contend, recorded_outcomes
from test_store import (
    admitted,
    circuit_breaker,
    open_the_breaker,
    rate_limit,
    rate_limits,
    store_maker,
)

from policy_engine.algorithms import ratelimit
from policy_engine.algorithms.breaker import Circuit
from policy_engine.algorithms.ratelimit import RateDecision
from policy_engine.errors import StoreError
from policy_engine.language.model import RateLimitSpec
from policy_engine.server.app import open_store
from policy_engine.state.memory import ConnectionLimits, MemoryStore
from policy_engine.state.redis_clients import connect
from policy_engine.state.redis_connections import ConnectionLeases
from policy_engine.state.redis_limits import RedisRateLimits, hash_tag, state_key
from policy_engine.state.redis_pipeline import Call, Pipeline
from policy_engine.state.redis_store import RedisStore

WAIT = 10.0  # a ceiling against hangs, never a measure of speed

# The shared suite: every test of test_store.py that takes a ``store`` runs here too, on
# the ``store`` fixture below.
globals().update(
    {
        name: test
        for name, test in vars(test_store).items()
        if name.startswith("test_") and "store" in inspect.signature(test).parameters
    }
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    with ClusterServers(tmp_path_factory.mktemp("cluster")).running() as servers:
        yield servers


@pytest.fixture
async def cluster_stores(cluster: ClusterServers) -> AsyncIterator[Callable[..., RedisStore]]:
    """``make(**options)``: RedisStores on the cluster sharing one fresh prefix."""
    async with store_maker(cluster.url) as make:
        yield make


@pytest.fixture
def store(cluster_stores: Callable[..., RedisStore]) -> RedisStore:
    return cluster_stores()


@pytest.fixture
async def cluster_client(cluster: ClusterServers) -> AsyncIterator[RedisCluster]:
    client = connect(cluster.url, socket_timeout=WAIT).client
    assert isinstance(client, RedisCluster)
    await client.initialize()
    yield client
    await client.aclose()


def slot_of(spec: RateLimitSpec, key: str) -> int:
    return key_slot(state_key("any", spec, key).encode())


# -- rate limits in several slots ----------------------------------------------------------------


async def test_limits_in_several_slots_decide_as_the_memory_store(
    cluster_stores: Callable[..., RedisStore],
) -> None:
    """Random events meeting one to three limits, each on its own key, on both stores at
    the same instants: every combined decision is the same, float for float. Events whose
    limits span several slots are judged by peek and commit; a refusal by one slot must
    leave the others untouched, as the memory store leaves them."""
    store = cluster_stores(near_cache=False)  # the near cache words refusals its own way
    memory = MemoryStore()
    specs = rate_limits("a 4/minute gcra 2", "b 3/minute sliding_window", "c 5/minute fixed_window")
    rng = random.Random(11)
    now = 1000.0
    spread = refused_by_one_slot = 0
    for _ in range(150):
        now += rng.choice([0.0, 0.0, 0.5, 3.0, 7.0])
        chosen = rng.sample(specs, rng.randint(1, 3))
        checks = [(spec, rng.choice(["k1", "k2", "k3"])) for spec in chosen]
        expected = await memory.check_rate_limits(checks, now)
        got = await store.check_rate_limits(checks, now)
        assert got == expected, (now, [(spec.name, key) for spec, key in checks])
        slots = {slot_of(spec, key) for spec, key in checks}
        spread += len(slots) > 1
        refused_by_one_slot += len(slots) > 1 and not got.allowed
    assert spread > 50
    assert refused_by_one_slot > 10


async def test_a_refusal_in_one_slot_consumes_nothing_in_the_others(store: RedisStore) -> None:
    wide, narrow = rate_limits("wide 5/minute fixed_window", "narrow 1/minute gcra")
    checks = [(wide, "ip1"), (narrow, "user1")]
    assert slot_of(wide, "ip1") != slot_of(narrow, "user1")
    assert (await store.check_rate_limits(checks, 1000.0)).allowed
    for _ in range(3):
        refused = await store.check_rate_limits(checks, 1000.0)
        assert (refused.allowed, refused.rule) == (False, "narrow")
    assert [await admitted(store, wide, "ip1", 1000.0) for _ in range(5)] == [True] * 4 + [False]


async def test_concurrent_events_across_slots_never_exceed_a_limit(
    cluster_stores: Callable[..., RedisStore],
) -> None:
    """Sixty events at once from two stores, each meeting a roomy limit and a tight one
    in another slot: exactly the tight limit's ten pass. The roomy one is charged for
    every admission, and may be for events the tight one refused at commit (the race
    between peek and commit the store documents)."""
    tight, roomy = rate_limit("tight 10/minute gcra 10"), rate_limit("roomy 1000/minute gcra 1000")
    checks = [(roomy, "everyone"), (tight, "ip1")]
    assert slot_of(roomy, "everyone") != slot_of(tight, "ip1")
    stores = [cluster_stores(), cluster_stores()]
    decisions = await asyncio.wait_for(
        asyncio.gather(*(stores[n % 2].check_rate_limits(checks, 1000.0) for n in range(60))),
        WAIT,
    )
    assert sum(d.allowed for d in decisions) == 10
    assert {d.rule for d in decisions if not d.allowed} == {"tight"}
    left = await stores[0].check_rate_limits([(roomy, "everyone")], 1000.0)
    assert left.decision is not None
    assert 1000 - 60 - 1 <= left.decision.remaining <= 1000 - 10 - 1


@pytest.mark.parametrize("rule", ["s 3/10s sliding_window", "g 3/10s gcra", "f 3/10s fixed_window"])
async def test_a_peek_answers_as_a_commit_would_and_writes_nothing(
    cluster_client: RedisCluster, rule: str
) -> None:
    """Three admissions, then a request of cost 2 after the first has left a sliding
    window (the peek reads past the expired time where the commit trims it), then one
    that passes: the peeks decide as the algorithm does and leave the state as it was."""
    spec = rate_limit(rule)
    limits = RedisRateLimits(cluster_client, f"test-{uuid4().hex}")
    key = limits.key(spec, "k")
    state = None

    async def run(now: float, cost: int, *, peek: bool) -> RateDecision | None:
        call, read = limits.check([(spec, "k")], now, cost, peek=peek)
        return read(await call.script(keys=call.keys, args=call.plain_args)).decision

    for now in (1000.0, 1005.0, 1006.0):
        expected, state = ratelimit.check(spec, state, now)
        assert await run(now, 1, peek=False) == expected
    for now, cost in ((1010.5, 2), (1030.0, 1)):
        expected, state = ratelimit.check(spec, state, now, cost)
        stored = await cluster_client.dump(key)
        assert await run(now, cost, peek=True) == expected
        assert await cluster_client.dump(key) == stored
        assert await run(now, cost, peek=False) == expected
    assert expected.allowed


# -- keys the clients chose ----------------------------------------------------------------------


BRACED = ["{x}", "{x}y", "a{x}", "}{", "{}", "{{x}}", "{"]


def test_the_slot_of_a_state_is_its_hash_tags_whatever_braces_the_key_holds() -> None:
    spec = rate_limit("per-ip 2/minute gcra")
    for key in BRACED:
        assert slot_of(spec, key) == key_slot(hash_tag("per-ip", key).encode()), key
    # A client cannot gather its keys in one slot by naming a common tag.
    assert len({slot_of(spec, key) for key in ["{x}1", "{x}2", "{x}3", "{x}4"]}) == 4


async def test_keys_with_braces_are_limited_each_on_its_own(store: RedisStore) -> None:
    first, second = rate_limits("first 2/minute fixed_window", "second 2/minute sliding_window")
    for key in BRACED:
        checks = [(first, key), (second, f"{key}:other")]
        answers = [(await store.check_rate_limits(checks, 1000.0)).allowed for _ in range(3)]
        assert answers == [True, True, False], key


# -- several stores, breakers, connections -------------------------------------------------------


async def test_stores_on_one_cluster_share_everything(
    cluster_stores: Callable[..., RedisStore],
) -> None:
    one, other = cluster_stores(), cluster_stores()
    spec = rate_limit("shared 5/minute gcra 5")
    assert [await admitted(one, spec, "ip1", 1000.0) for _ in range(3)] == [True] * 3
    assert [await admitted(other, spec, "ip1", 1000.0) for _ in range(3)] == [True, True, False]
    breaker = circuit_breaker()
    await open_the_breaker(one, breaker, 100.0)
    assert not (await other.breaker_acquire(breaker, 110.0)).permitted
    assert (await other.fetch_breaker_state(breaker.name)).circuit is Circuit.OPEN
    ceiling = ConnectionLimits("u1", "10.0.0.1", None, 1, None)
    assert await one.open_connection(ceiling) is None
    assert await other.open_connection(ceiling) == "max_per_user"
    await one.record_auth_failure("ip:1", 60.0, 100.0)
    assert await other.record_auth_failure("ip:1", 60.0, 101.0) == 2
    assert await one.append_replay("c1", "oh_event", {"n": 1}, 10, 100.0) == 1
    assert await other.append_replay("c1", "oh_event", {"n": 2}, 10, 101.0) == 2
    replayed = await one.replay_since("c1", 0, 60.0, 102.0)
    assert replayed is not None
    assert [e.data for e in replayed] == [{"n": 1}, {"n": 2}]


async def test_a_process_that_stops_renewing_its_lease_stops_counting(
    cluster_client: RedisCluster,
) -> None:
    prefix = f"test-{uuid4().hex}"
    live = ConnectionLeases(cluster_client, prefix)
    silent = ConnectionLeases(cluster_client, prefix, lease_ttl=0.3)
    ceiling = ConnectionLimits("u1", "10.0.0.1", 2, None, None)
    for leases in (silent, live):
        call, reached = leases.open(ceiling)
        assert reached(await call.script(keys=call.keys, args=call.plain_args)) is None
    call, reached = live.open(ceiling)
    assert reached(await call.script(keys=call.keys, args=call.plain_args)) == "max_total"
    await asyncio.sleep(0.5)  # the silent lease runs out; the next call reaps it
    call, reached = live.open(ceiling)
    assert reached(await call.script(keys=call.keys, args=call.plain_args)) is None


# -- batches and nodes ---------------------------------------------------------------------------


async def test_a_batch_goes_to_each_node_in_one_round_trip_and_reloads_forgotten_scripts(
    cluster_client: RedisCluster,
) -> None:
    pipeline = Pipeline(cluster_client)
    script = cluster_client.register_script("return KEYS[1]")
    keys = [f"key-{n}" for n in range(30)]
    nodes = {cluster_client.get_node_from_key(key) for key in keys}
    assert len(nodes) == 3

    async def run_all() -> list[Any]:
        calls = [pipeline.run(Call(script, [key], [])) for key in keys]
        return await asyncio.wait_for(asyncio.gather(*calls), WAIT)

    expected = [key.encode() for key in keys]

    async def reloaded() -> None:
        """Unknown everywhere: one pipeline per node, the script loaded once per node (the
        calls of a node wait for its load), then the calls sent again: at most one batch
        per node, each to its node alone."""
        before = (pipeline.batches, pipeline.round_trips)
        assert await run_all() == expected
        batches, round_trips = pipeline.batches - before[0], pipeline.round_trips - before[1]
        assert 2 <= batches <= 4
        assert round_trips == 6

    await reloaded()
    before = (pipeline.batches, pipeline.round_trips)
    assert await run_all() == expected  # known everywhere: one batch, one trip per node
    assert (pipeline.batches - before[0], pipeline.round_trips - before[1]) == (1, 3)
    await cluster_client.script_flush()
    await reloaded()


async def test_a_node_that_stops_fails_only_its_own_calls_and_serves_again_once_back(
    cluster: ClusterServers, cluster_client: RedisCluster
) -> None:
    spec = rate_limit("per-ip 5/minute gcra")
    limits = RedisRateLimits(cluster_client, f"test-{uuid4().hex}")
    by_port: dict[int, str] = {}
    for n in range(100):
        node = cluster_client.get_node_from_key(limits.key(spec, f"ip{n}"))
        assert node is not None
        by_port.setdefault(node.port, f"ip{n}")
    assert len(by_port) == 3
    down = cluster.nodes[0]
    store = RedisStore(cluster.url, prefix=limits.prefix, server_clock=False, socket_timeout=0.3)
    try:
        assert all([await admitted(store, spec, key, 100.0) for key in by_port.values()])
        down.stop()
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    *(admitted(store, spec, key, 101.0) for key in by_port.values()),
                    return_exceptions=True,
                ),
                WAIT,
            )
            answers = zip(by_port, outcomes, strict=True)
            failed = {port for port, outcome in answers if outcome is not True}
            assert failed == {down.port}
            assert all(isinstance(o, StoreError) for o in outcomes if o is not True)
        finally:
            down.start()  # same port, same cluster configuration, no data, no scripts
            for node in cluster.nodes:
                wait_for(lambda node=node: ClusterServers.is_ok(node), "the cluster")
        assert await asyncio.wait_for(admitted(store, spec, by_port[down.port], 102.0), WAIT)
    finally:
        await store.close()


async def test_a_master_replaced_by_its_replica_is_found_without_a_restart(
    tmp_path: Path,
) -> None:
    """The first master stops and its replica takes its slots: the calls for them fail
    (the store still knows the old master) until the store reads the cluster's slots
    again, then go on with the state that was replicated."""
    spec = rate_limit("per-ip 3/hour gcra 3")
    with ClusterServers(tmp_path / "cluster", replica=True).running() as cluster:
        first = cluster.nodes[0]
        with first.client() as client:
            served = client.execute_command("CLUSTER", "SLOTS")
        ranges = [(int(s[0]), int(s[1])) for s in served if int(s[2][1]) == first.port]
        key = next(
            f"ip{n}"
            for n in range(1000)
            if any(low <= slot_of(spec, f"ip{n}") <= high for low, high in ranges)
        )
        store = RedisStore(cluster.url, prefix="takeover", server_clock=False, socket_timeout=0.3)
        try:
            assert [await admitted(store, spec, key, 100.0) for _ in range(2)] == [True, True]
            with first.client() as client:
                assert client.execute_command("WAIT", 1, int(WAIT * 1000)) == 1
            await asyncio.to_thread(cluster.take_over)
            failures = 0
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    third = await asyncio.wait_for(admitted(store, spec, key, 101.0), WAIT)
                    break
                except StoreError:
                    failures += 1
                    assert time.monotonic() < deadline, "the store never found the new master"
                    await asyncio.sleep(0.05)
            assert failures >= 1  # the old master was asked first, and is gone
            assert third  # the third of three: the two before were replicated
            assert not await admitted(store, spec, key, 101.0)
        finally:
            await store.close()


async def test_a_cluster_url_opens_a_cluster_store(cluster: ClusterServers) -> None:
    store = open_store(cluster.url + "/0?socket_timeout=2")
    assert isinstance(store, RedisStore)
    try:
        spec = rate_limit(f"per-ip-{uuid4().hex[:8]} 1/minute gcra")
        assert await admitted(store, spec, "ip1", time.time())
        assert not await admitted(store, spec, "ip1", time.time())
        await store.ping()
    finally:
        await store.close()


# -- processes -----------------------------------------------------------------------------------

PROCESSES = 4
IN_FLIGHT = 100


def test_four_processes_on_one_key_get_exactly_the_allowance_and_lose_no_outcome(
    cluster: ClusterServers,
) -> None:
    prefix = f"t-{uuid4().hex}"
    reports = contend(cluster.url, prefix, PROCESSES, IN_FLIGHT)

    # 100 an hour with a burst of 100: exactly 100 of the 400, whatever the interleaving.
    assert sum(report["admitted"] for report in reports) == 100
    assert [report["failures"] for report in reports] == [0] * PROCESSES
    assert [report["unavailable"] for report in reports] == [0] * PROCESSES
    assert recorded_outcomes(cluster.url, prefix) == PROCESSES * IN_FLIGHT  # none lost
