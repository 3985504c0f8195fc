"""Every state store, one suite: the memory store and Redis answer the same calls alike.

The ``store`` fixture runs each test on a :class:`MemoryStore` and on a :class:`RedisStore`
backed by a real redis-server on a free loopback port (each test under its own key
prefix). Time is the explicit ``now`` every store method takes; nothing sleeps. The tests
after the shared suite need Redis itself: several stores on one server, contention, and
an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import uuid4

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer

from policy_engine.algorithms.breaker import Circuit, Reason
from policy_engine.compiler.pipeline import compile_text
from policy_engine.errors import StoreError
from policy_engine.language.model import CircuitBreakerSpec, PolicySet, RateLimitSpec
from policy_engine.state.codec import (
    decode_payload,
    encode_payload,
)
from policy_engine.state.memory import ConnectionLimits, MemoryStore, StateStore
from policy_engine.state.redis_limits import RedisRateLimits
from policy_engine.state.redis_store import RedisStore

WAIT = 5.0  # a ceiling against hangs, never a measure of speed

# -- fixtures ------------------------------------------------------------------------------------


BUSY_MACHINE_TIMEOUT = 5.0
"""The stores' socket timeout where a test is not about timeouts: a busy machine can take
longer than the default half second to answer, and that is no failure of what is tested."""


@contextlib.asynccontextmanager
async def store_maker(url: str) -> AsyncIterator[Callable[..., RedisStore]]:
    """``make(**options)``: RedisStores on ``url`` sharing one fresh prefix, closed after."""
    prefix = f"test-{uuid4().hex}"
    made: list[RedisStore] = []

    def make(**options: Any) -> RedisStore:
        options.setdefault("prefix", prefix)
        options.setdefault("server_clock", False)  # the tests name their instants
        options.setdefault("socket_timeout", BUSY_MACHINE_TIMEOUT)
        store = RedisStore(url, **options)
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()


@pytest.fixture
async def redis_stores(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisStore]]:
    """``make(**options)``: RedisStores on the module's server sharing one fresh prefix."""
    async with store_maker(redis_server.url) as make:
        yield make


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Which store a test of the shared suite runs on: "memory", or a Redis URL."""
    if request.param == "memory":
        return "memory"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[StateStore]:
    if store_url == "memory":
        yield MemoryStore()
        return
    redis_store = RedisStore(
        store_url,
        prefix=f"test-{uuid4().hex}",
        server_clock=False,
        socket_timeout=BUSY_MACHINE_TIMEOUT,
    )
    yield redis_store
    await redis_store.close()


# -- policies ------------------------------------------------------------------------------------


@functools.cache
def policy(text: str) -> PolicySet:
    return compile_text("version: 1\n" + text).policy


def rate_limits(*rules: str) -> tuple[RateLimitSpec, ...]:
    """Rate-limit specs compiled from ``name: limit algorithm [burst]`` lines."""
    text = "rate_limits:\n"
    for rule in rules:
        name, limit, algorithm, *burst = rule.split()
        text += (
            f"  - {{name: {name}, hook: connect, key: conn.ip, limit: {limit}, "
            f"algorithm: {algorithm}"
        )
        text += f", burst: {burst[0]}}}\n" if burst else "}\n"
    return policy(text).rate_limits


def rate_limit(rule: str) -> RateLimitSpec:
    return rate_limits(rule)[0]


def circuit_breaker(window: str = "{calls: 4}", minimum_calls: int = 4) -> CircuitBreakerSpec:
    text = f"""
circuit_breakers:
  - name: agent-runtime
    match: event.name == "call"
    failure_rate: 50%
    window: {window}
    minimum_calls: {minimum_calls}
    open_for: 30s
    half_open_calls: 2
"""
    return policy(text).circuit_breakers[0]


async def admitted(store: StateStore, spec: RateLimitSpec, key: str, now: float) -> bool:
    return (await store.check_rate_limits([(spec, key)], now)).allowed


# -- rate limits ---------------------------------------------------------------------------------


async def test_gcra_admits_the_burst_then_one_per_interval(store: StateStore) -> None:
    spec = rate_limit("per-ip 6/minute gcra 3")  # one every 10 s, three at once
    assert [await admitted(store, spec, "ip1", 1000.0) for _ in range(3)] == [True] * 3
    refused = await store.check_rate_limits([(spec, "ip1")], 1000.0)
    assert not refused.allowed
    assert refused.retry_after == 10.0
    assert refused.rule == "per-ip"
    assert await admitted(store, spec, "ip2", 1000.0)  # another key has its own bucket
    assert not await admitted(store, spec, "ip1", 1009.5)
    assert await admitted(store, spec, "ip1", 1010.0)
    assert not await admitted(store, spec, "ip1", 1010.0)
    assert [await admitted(store, spec, "ip1", 2000.0) for _ in range(4)] == [True] * 3 + [False]


async def test_sliding_window_counts_the_last_period(store: StateStore) -> None:
    spec = rate_limit("per-ip 3/minute sliding_window")
    for now in (1000.0, 1010.0, 1020.0):
        assert await admitted(store, spec, "ip1", now)
    refused = await store.check_rate_limits([(spec, "ip1")], 1030.0)
    assert not refused.allowed
    assert refused.retry_after == 30.0  # when the admission at 1000 leaves the window
    assert not await admitted(store, spec, "ip1", 1059.0)
    assert await admitted(store, spec, "ip1", 1060.0)
    assert not await admitted(store, spec, "ip1", 1065.0)
    assert await admitted(store, spec, "ip1", 1070.0)


async def test_fixed_window_resets_at_the_aligned_boundary(store: StateStore) -> None:
    spec = rate_limit("per-ip 3/minute fixed_window")  # windows [960, 1020), [1020, 1080)
    assert [await admitted(store, spec, "ip1", 1000.0) for _ in range(3)] == [True] * 3
    refused = await store.check_rate_limits([(spec, "ip1")], 1000.0)
    assert not refused.allowed
    assert refused.retry_after == 20.0
    assert not await admitted(store, spec, "ip1", 1019.9)
    assert [await admitted(store, spec, "ip1", 1020.0) for _ in range(4)] == [True] * 3 + [False]


async def test_no_limit_to_check_admits(store: StateStore) -> None:
    decision = await store.check_rate_limits([], 1000.0)
    assert decision.allowed
    assert decision.rule is None


async def test_a_joint_check_consumes_from_every_limit_or_from_none(store: StateStore) -> None:
    wide, narrow = rate_limits("wide 5/minute fixed_window", "narrow 2/minute fixed_window")
    checks = [(wide, "ip1"), (narrow, "user1")]
    first = await store.check_rate_limits(checks, 1000.0)
    assert first.allowed
    assert first.rule == "narrow"  # the limit closest to refusing
    assert (await store.check_rate_limits(checks, 1000.0)).allowed
    for _ in range(3):
        refused = await store.check_rate_limits(checks, 1000.0)
        assert not refused.allowed
        assert refused.rule == "narrow"
        assert refused.retry_after == 20.0
    # The refusals took nothing from "wide": three of its five are left.
    assert [await admitted(store, wide, "ip1", 1000.0) for _ in range(4)] == [True] * 3 + [False]


async def test_a_joint_refusal_by_the_first_limit_leaves_the_second_alone(
    store: StateStore,
) -> None:
    first, second = rate_limits("first 1/minute gcra", "second 3/minute sliding_window")
    assert (await store.check_rate_limits([(first, "a"), (second, "b")], 1000.0)).allowed
    for _ in range(3):
        refused = await store.check_rate_limits([(first, "a"), (second, "b")], 1000.0)
        assert (refused.allowed, refused.rule) == (False, "first")
    assert [await admitted(store, second, "b", 1000.0) for _ in range(3)] == [True, True, False]


async def test_a_rule_keeps_its_state_when_its_limit_changes(store: StateStore) -> None:
    before = rate_limit("per-ip 3/minute fixed_window")
    assert [await admitted(store, before, "ip1", 1000.0) for _ in range(3)] == [True] * 3
    raised = rate_limit("per-ip 5/minute fixed_window")  # a reload raised the limit
    assert [await admitted(store, raised, "ip1", 1001.0) for _ in range(3)] == [True, True, False]
    renamed = rate_limit("by-ip 5/minute fixed_window")  # another rule: its own counters
    assert await admitted(store, renamed, "ip1", 1001.0)


async def test_a_rule_that_changes_algorithm_starts_over(store: StateStore) -> None:
    log = rate_limit("per-ip 2/minute sliding_window")
    assert [await admitted(store, log, "ip1", 1000.0) for _ in range(3)] == [True, True, False]
    bucket = rate_limit("per-ip 2/minute gcra")
    assert [await admitted(store, bucket, "ip1", 1000.0) for _ in range(3)] == [True, True, False]


async def test_keys_of_clients_long_gone_are_evicted_by_age_not_only_by_count() -> None:
    store = MemoryStore()
    spec = rate_limit("per-ip 10/minute gcra")
    for n in range(1_000):
        assert await admitted(store, spec, f"gone-{n}", 100.0)
    assert store.rate_keys("per-ip") == 1_000
    assert await admitted(store, spec, "newcomer", 400.0)  # every other state emptied
    assert store.rate_keys("per-ip") == 1


async def test_the_states_of_a_rule_a_reload_removed_are_evicted_by_age() -> None:
    store = MemoryStore()
    removed, kept = rate_limit("removed 10/minute gcra"), rate_limit("kept 10/minute gcra")
    for n in range(100):
        assert await admitted(store, removed, f"ip{n}", 100.0)
    assert await admitted(store, kept, "ip-a", 400.0)  # only this rule is checked now
    assert store.rate_keys("removed") == 0
    assert "removed" not in store._rates


# -- circuit breakers ----------------------------------------------------------------------------


async def open_the_breaker(store: StateStore, spec: CircuitBreakerSpec, now: float) -> None:
    transitions = []
    for failed in (False, True, False, True):
        permit = await store.breaker_acquire(spec, now)
        assert (permit.permitted, permit.circuit) == (True, Circuit.CLOSED)
        transitions.append(await store.breaker_record(spec, now, failed=failed, duration=0.1))
    assert transitions[:3] == [None, None, None]
    opened = transitions[3]
    assert opened is not None
    assert (opened.from_state, opened.to_state) == (Circuit.CLOSED, Circuit.OPEN)
    assert opened.reason is Reason.FAILURE_RATE


async def test_a_breaker_opens_on_the_failure_rate_after_minimum_calls(store: StateStore) -> None:
    spec = circuit_breaker()
    for _ in range(3):
        await store.breaker_acquire(spec, 100.0)
        assert await store.breaker_record(spec, 100.0, failed=True, duration=0.1) is None
    # Three failures out of three, but fewer calls than minimum_calls: still closed.
    assert (await store.breaker_acquire(spec, 100.0)).permitted
    transition = await store.breaker_record(spec, 100.0, failed=True, duration=0.1)
    assert transition is not None
    assert transition.to_state is Circuit.OPEN
    refused = await store.breaker_acquire(spec, 110.0)
    assert (refused.permitted, refused.circuit) == (False, Circuit.OPEN)
    assert refused.retry_after == 20.0


async def test_an_open_breaker_probes_then_closes(store: StateStore) -> None:
    spec = circuit_breaker()
    await open_the_breaker(store, spec, 100.0)
    assert not (await store.breaker_acquire(spec, 129.0)).permitted
    # An outcome of a call admitted before it opened changes nothing.
    assert await store.breaker_record(spec, 129.0, failed=False, duration=0.1) is None
    probe = await store.breaker_acquire(spec, 130.0)
    assert (probe.permitted, probe.circuit) == (True, Circuit.HALF_OPEN)
    assert probe.transition is not None
    assert probe.transition.reason is Reason.OPEN_FOR_ELAPSED
    assert (await store.breaker_acquire(spec, 130.0)).permitted  # the second probe
    busy = await store.breaker_acquire(spec, 130.0)
    assert (busy.permitted, busy.circuit, busy.retry_after) == (False, Circuit.HALF_OPEN, 30.0)
    await store.breaker_release(spec)  # a probe that never ran gives its permit back
    assert (await store.breaker_acquire(spec, 131.0)).permitted
    assert not (await store.breaker_acquire(spec, 131.0)).permitted
    assert await store.breaker_record(spec, 132.0, failed=False, duration=0.1) is None
    closed = await store.breaker_record(spec, 132.0, failed=False, duration=0.1)
    assert closed is not None
    assert (closed.from_state, closed.to_state) == (Circuit.HALF_OPEN, Circuit.CLOSED)
    assert closed.reason is Reason.PROBES_SUCCEEDED
    assert (await store.breaker_acquire(spec, 133.0)).circuit is Circuit.CLOSED


async def test_a_failed_probe_opens_the_breaker_again(store: StateStore) -> None:
    spec = circuit_breaker()
    await open_the_breaker(store, spec, 100.0)
    await store.breaker_acquire(spec, 130.0)
    await store.breaker_acquire(spec, 130.0)
    assert await store.breaker_record(spec, 131.0, failed=True, duration=0.1) is None
    reopened = await store.breaker_record(spec, 131.0, failed=False, duration=0.1)
    assert reopened is not None
    assert (reopened.from_state, reopened.to_state) == (Circuit.HALF_OPEN, Circuit.OPEN)
    refused = await store.breaker_acquire(spec, 141.0)
    assert (refused.permitted, refused.retry_after) == (False, 20.0)


async def test_a_time_window_breaker_forgets_old_outcomes(store: StateStore) -> None:
    spec = circuit_breaker(window="{time: 10s}", minimum_calls=2)
    assert await store.breaker_record(spec, 100.0, failed=True, duration=0.1) is None
    # The failure at 100 has left the window by 111: one call of one, under minimum_calls.
    assert await store.breaker_record(spec, 111.0, failed=True, duration=0.1) is None
    opened = await store.breaker_record(spec, 112.0, failed=False, duration=0.1)
    assert opened is not None
    assert opened.to_state is Circuit.OPEN


async def test_releasing_a_closed_breaker_changes_nothing(store: StateStore) -> None:
    spec = circuit_breaker()
    await store.breaker_release(spec)
    permit = await store.breaker_acquire(spec, 100.0)
    assert (permit.permitted, permit.circuit, permit.transition) == (True, Circuit.CLOSED, None)


# -- connections ---------------------------------------------------------------------------------


def limits(user: str, ip: str) -> ConnectionLimits:
    return ConnectionLimits(user, ip, max_total=4, max_per_user=2, max_per_ip=3)


async def test_connections_stop_at_each_ceiling_and_count_nothing_when_refused(
    store: StateStore,
) -> None:
    assert await store.open_connection(limits("u1", "10.0.0.1")) is None
    assert await store.open_connection(limits("u1", "10.0.0.1")) is None
    assert await store.open_connection(limits("u1", "10.0.0.2")) == "max_per_user"
    assert await store.open_connection(limits("u2", "10.0.0.1")) is None
    assert await store.open_connection(limits("u3", "10.0.0.1")) == "max_per_ip"
    # Neither refusal was counted: one connection is left under max_total.
    assert await store.open_connection(limits("u3", "10.0.0.2")) is None
    assert await store.open_connection(limits("u4", "10.0.0.3")) == "max_total"


async def test_closing_a_connection_releases_its_counters(store: StateStore) -> None:
    for _ in range(2):
        assert await store.open_connection(limits("u1", "10.0.0.1")) is None
    assert await store.open_connection(limits("u1", "10.0.0.1")) == "max_per_user"
    await store.close_connection("u1", "10.0.0.1")
    assert await store.open_connection(limits("u1", "10.0.0.1")) is None
    for _ in range(3):
        await store.close_connection("u1", "10.0.0.1")  # one more than open: stays at zero
    for _ in range(2):
        assert await store.open_connection(limits("u1", "10.0.0.1")) is None
    assert await store.open_connection(limits("u1", "10.0.0.1")) == "max_per_user"


async def test_anonymous_connections_have_no_per_user_ceiling(store: StateStore) -> None:
    for _ in range(3):
        assert await store.open_connection(limits("", "10.0.0.1")) is None
    assert await store.open_connection(limits("", "10.0.0.1")) == "max_per_ip"
    unlimited = ConnectionLimits("u1", "10.0.0.9", None, None, None)
    for _ in range(10):
        assert await store.open_connection(unlimited) is None


# -- authentication failures ---------------------------------------------------------------------


async def test_auth_failures_are_counted_within_the_window(store: StateStore) -> None:
    assert await store.auth_failures("ip:1", 60.0, 100.0) == (0, 0.0)
    counts = [await store.record_auth_failure("ip:1", 60.0, now) for now in (100.0, 110.0, 120.0)]
    assert counts == [1, 2, 3]
    assert await store.auth_failures("ip:1", 60.0, 150.0) == (3, 120.0)
    assert await store.auth_failures("ip:1", 60.0, 160.0) == (2, 120.0)  # 100 is out (<=)
    assert await store.auth_failures("user:1", 60.0, 160.0) == (0, 0.0)
    assert await store.record_auth_failure("ip:1", 60.0, 175.0) == 2  # 110 left too
    assert await store.auth_failures("ip:1", 60.0, 236.0) == (0, 0.0)
    assert await store.record_auth_failure("ip:1", 60.0, 240.0) == 1


async def test_clearing_auth_failures_forgets_them(store: StateStore) -> None:
    for now in (100.0, 101.0):
        await store.record_auth_failure("user:1", 900.0, now)
    await store.clear_auth_failures("user:1")
    assert await store.auth_failures("user:1", 900.0, 102.0) == (0, 0.0)
    assert await store.record_auth_failure("user:1", 900.0, 103.0) == 1


async def test_auth_failures_keep_the_newest_thousand(store: StateStore) -> None:
    for n in range(1005):
        await store.record_auth_failure("ip:1", 1e6, 100.0 + n)
    assert await store.auth_failures("ip:1", 1e6, 2000.0) == (1000, 1104.0)


async def test_failed_sign_ins_of_clients_long_gone_are_forgotten_by_age() -> None:
    store = MemoryStore()
    for n in range(1_000):
        await store.record_auth_failure(f"ip:10.0.{n // 250}.{n % 250}", 60.0, 100.0)
    assert store.auth_failure_keys() == 1_000
    assert await store.record_auth_failure("ip:192.0.2.1", 60.0, 200.0) == 1
    assert store.auth_failure_keys() == 1


# -- replay buffers ------------------------------------------------------------------------------


async def test_a_replay_returns_exactly_the_missed_events_in_order(store: StateStore) -> None:
    ids = [await store.append_replay("c1", "oh_event", {"n": n}, 10, 100.0 + n) for n in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    missed = await store.replay_since("c1", 2, 60.0, 106.0)
    assert missed is not None
    assert [(e.event_id, e.event, e.data) for e in missed] == [
        (3, "oh_event", {"n": 2}),
        (4, "oh_event", {"n": 3}),
        (5, "oh_event", {"n": 4}),
    ]
    assert await store.replay_since("c1", 5, 60.0, 106.0) == []
    assert await store.replay_since("c1", 9, 60.0, 106.0) is None  # an id it never had


async def test_more_missed_than_buffered_cannot_be_replayed(store: StateStore) -> None:
    for n in range(5):
        await store.append_replay("c1", "oh_event", n, 3, 100.0)
    assert await store.replay_since("c1", 1, 60.0, 100.0) is None
    replayed = await store.replay_since("c1", 2, 60.0, 100.0)
    assert replayed is not None
    assert [e.event_id for e in replayed] == [3, 4, 5]


async def test_events_older_than_max_age_cannot_be_replayed(store: StateStore) -> None:
    await store.append_replay("c1", "oh_event", "old", 10, 100.0)
    await store.append_replay("c1", "oh_event", "new", 10, 150.0)
    assert await store.replay_since("c1", 0, 60.0, 170.0) is None  # "old" is 70 s old
    replayed = await store.replay_since("c1", 1, 60.0, 170.0)
    assert replayed is not None
    assert [e.data for e in replayed] == ["new"]


async def test_an_unknown_stream_replays_nothing(store: StateStore) -> None:
    assert await store.replay_since("nobody", 0, 60.0, 100.0) == []
    assert await store.replay_since("nobody", 3, 60.0, 100.0) is None


async def test_idle_streams_are_dropped_but_their_ids_keep_counting(store: StateStore) -> None:
    for n in range(3):
        await store.append_replay("quiet", "oh_event", n, 500, 100.0, retain=120.0)
    still_there = await store.replay_since("quiet", 2, 1_000.0, 230.0)
    assert still_there is not None
    assert [e.event_id for e in still_there] == [3]
    await store.append_replay("busy", "oh_event", "x", 500, 230.0, retain=120.0)
    # "quiet" saw nothing for longer than the 120 s anyone could recover within: dropped
    assert await store.replay_since("quiet", 2, 1_000.0, 230.0) is None
    assert await store.replay_since("quiet", 3, 120.0, 230.0) == []  # had seen everything
    assert await store.replay_since("quiet", 1, 120.0, 230.0) is None  # its events are gone
    assert await store.append_replay("quiet", "oh_event", "again", 500, 300.0, retain=120.0) == 4
    replayed = await store.replay_since("quiet", 3, 120.0, 300.0)
    assert replayed is not None
    assert [e.event_id for e in replayed] == [4]


async def test_streams_with_recent_events_are_kept(store: StateStore) -> None:
    await store.append_replay("a", "oh_event", 1, 500, 100.0, retain=120.0)
    await store.append_replay("b", "oh_event", 1, 500, 150.0, retain=120.0)
    await store.append_replay("a", "oh_event", 2, 500, 210.0, retain=120.0)
    for stream in ("a", "b"):
        replayed = await store.replay_since(stream, 0, 1_000.0, 210.0)
        assert replayed is not None
        assert replayed[0].data == 1


async def test_a_shorter_buffer_keeps_the_newest_events(store: StateStore) -> None:
    for n in range(4):
        await store.append_replay("c1", "oh_event", n, 4, 100.0)
    await store.append_replay("c1", "oh_event", 4, 2, 100.0)  # the policy cut the buffer
    assert await store.replay_since("c1", 2, 60.0, 100.0) is None
    replayed = await store.replay_since("c1", 3, 60.0, 100.0)
    assert replayed is not None
    assert [e.data for e in replayed] == [3, 4]


KB_TEXT = "x" * 1000  # about 1 KB buffered, whichever store measures it


async def test_a_buffer_over_its_bytes_evicts_its_oldest_events(store: StateStore) -> None:
    for _ in range(4):
        await store.append_replay("c1", "oh_event", KB_TEXT, 500, 100.0, max_bytes=2500)
    assert await store.replay_since("c1", 1, 60.0, 100.0) is None  # event 2 was evicted
    replayed = await store.replay_since("c1", 2, 60.0, 100.0)
    assert replayed is not None
    assert [e.event_id for e in replayed] == [3, 4]


async def test_all_buffers_over_the_total_evict_the_least_recently_active_first(
    store: StateStore,
) -> None:
    for at, stream in enumerate(["a", "b", "c"]):
        await store.append_replay(
            stream, "oh_event", KB_TEXT, 500, 100.0 + at, max_total_bytes=2500
        )
    assert await store.replay_since("a", 0, 60.0, 103.0) is None  # missed an evicted event
    for stream in ("b", "c"):
        replayed = await store.replay_since(stream, 0, 60.0, 103.0)
        assert replayed is not None
        assert [e.data for e in replayed] == [KB_TEXT]
    # The evicted stream's ids go on, so nobody is handed a replay of different events.
    assert await store.append_replay("a", "oh_event", "small", 500, 104.0) == 2
    assert await store.replay_since("a", 0, 60.0, 104.0) is None
    replayed = await store.replay_since("a", 1, 60.0, 104.0)
    assert replayed is not None
    assert [e.data for e in replayed] == ["small"]


async def test_an_event_larger_than_the_buffer_is_not_kept_and_cannot_be_replayed(
    store: StateStore,
) -> None:
    await store.append_replay("c1", "oh_event", "small", 500, 100.0, max_bytes=500)
    assert await store.append_replay("c1", "oh_event", KB_TEXT, 500, 100.0, max_bytes=500) == 2
    assert await store.replay_since("c1", 1, 60.0, 100.0) is None
    assert await store.replay_since("c1", 2, 60.0, 100.0) == []


async def test_client_named_streams_leave_nothing_once_nobody_can_recover_from_them() -> None:
    store = MemoryStore()
    for n in range(1_000):
        await store.append_replay(f"sprayed-{n}", "oh_event", "x", 500, 100.0, retain=10.0)
    await store.append_replay("live", "oh_event", "x", 500, 115.0, retain=10.0)
    assert store.replay_counts()[:2] == (1, 1_000)  # dropped, their last ids kept a while
    await store.append_replay("live", "oh_event", "x", 500, 121.0, retain=10.0)
    assert store.replay_counts()[:2] == (1, 0)  # twice retain after their last event


async def test_a_dropped_streams_last_id_lives_twice_retain_on_redis(
    redis_stores: Callable[..., RedisStore], redis_server: RedisServer
) -> None:
    store = redis_stores()
    await store.append_replay("client-named", "oh_event", "x", 500, 100.0, retain=120.0)
    client = Redis.from_url(redis_server.url)
    try:
        ttl_ms = await client.pttl(f"{{{store.prefix}:replay}}:id:client-named")
    finally:
        await client.aclose()
    assert 200_000 < ttl_ms <= 240_000


async def test_the_bytes_redis_counts_are_the_bytes_its_buffers_hold(
    redis_stores: Callable[..., RedisStore], redis_server: RedisServer
) -> None:
    store = redis_stores()
    rng = random.Random(7)
    for step in range(300):
        stream = f"c{rng.randrange(6)}"
        data = "x" * rng.randrange(10, 900)
        await store.append_replay(
            stream,
            "oh_event",
            data,
            8,
            100.0 + step,
            retain=40.0,
            max_bytes=3000,
            max_total_bytes=9000,
        )
    client = Redis.from_url(redis_server.url)
    try:
        held = 0
        tag = f"{{{store.prefix}:replay}}"
        for key in await client.keys(f"{tag}:stream:*"):
            held += sum(len(entry) for entry in await client.lrange(key, 0, -1))
        total = int(await client.get(f"{tag}:total"))
        per_stream = await client.hgetall(f"{tag}:bytes")
    finally:
        await client.aclose()
    assert total == held
    assert sum(int(value) for value in per_stream.values()) == held
    assert 0 < held <= 9000


PAYLOADS: list[Any] = [
    {"text": "hello", "n": 1, "ratio": 0.1, "ok": True, "none": None, "list": [1, "two"]},
    {"file": b"\x00\x01binary\xff", "nested": [{"chunk": b""}, b"tail"]},
    b"just bytes",
    {"$bytes": "not base64, a key that looks like a tag"},
    {"$dict": {"$bytes": b"tagged"}},
    "plain text",
    ["a", 1, None],
    {},
]


@pytest.mark.parametrize("data", PAYLOADS)
async def test_payloads_come_back_as_they_were_sent(store: StateStore, data: Any) -> None:
    await store.append_replay("c1", "oh_event", data, 10, 100.0)
    replayed = await store.replay_since("c1", 0, 60.0, 100.0)
    assert replayed is not None
    assert replayed[0].data == data


# -- the payload codec ---------------------------------------------------------------------------


def test_payload_encoding_is_plain_json_without_bytes() -> None:
    assert encode_payload({"a": [1, {"b": None}]}) == {"a": [1, {"b": None}]}
    assert decode_payload(encode_payload((1, b"x"))) == [1, b"x"]


# -- Redis only: several stores on one server ----------------------------------------------------


async def test_stores_on_one_redis_share_their_limits(
    redis_stores: Callable[..., RedisStore],
) -> None:
    one, other = redis_stores(), redis_stores()
    spec = rate_limit("shared 5/minute gcra 5")
    assert [await admitted(one, spec, "ip1", 1000.0) for _ in range(3)] == [True] * 3
    assert [await admitted(other, spec, "ip1", 1000.0) for _ in range(2)] == [True] * 2
    assert not await admitted(one, spec, "ip1", 1000.0)
    assert not await admitted(other, spec, "ip1", 1000.0)


async def test_stores_on_one_redis_share_breakers_connections_and_replays(
    redis_stores: Callable[..., RedisStore],
) -> None:
    one, other = redis_stores(), redis_stores()
    spec = circuit_breaker()
    await open_the_breaker(one, spec, 100.0)
    assert not (await other.breaker_acquire(spec, 110.0)).permitted
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


async def test_stores_with_other_prefixes_share_nothing(
    redis_stores: Callable[..., RedisStore],
) -> None:
    spec = rate_limit("shared 1/minute gcra")
    assert await admitted(redis_stores(), spec, "ip1", 1000.0)
    assert await admitted(redis_stores(prefix=f"other-{uuid4().hex}"), spec, "ip1", 1000.0)


@pytest.mark.parametrize(
    "rule",
    ["racy 10/minute gcra 10", "racy 10/minute sliding_window", "racy 10/minute fixed_window"],
)
async def test_concurrent_checks_never_admit_more_than_the_limit(
    redis_stores: Callable[..., RedisStore], rule: str
) -> None:
    spec = rate_limit(rule)
    other = rate_limit("roomy 1000/minute fixed_window")
    stores = [redis_stores(), redis_stores()]
    checks = [(other, "everyone"), (spec, "ip1")]
    decisions = await asyncio.wait_for(
        asyncio.gather(*(stores[n % 2].check_rate_limits(checks, 1000.0) for n in range(60))),
        WAIT * 4,
    )
    assert sum(d.allowed for d in decisions) == 10
    assert {d.rule for d in decisions if not d.allowed} == {"racy"}
    # All or nothing held under contention too: "roomy" was charged for admissions only.
    roomy = await stores[0].check_rate_limits([(other, "everyone")], 1000.0)
    assert roomy.decision is not None
    assert roomy.decision.remaining == 1000 - 10 - 1


async def test_contention_never_fails_a_rate_limit_call(
    redis_stores: Callable[..., RedisStore],
) -> None:
    """One script per decision: forty writers at once on one key all get an answer, and
    the key was charged exactly once for each admission."""
    spec = rate_limit("racy 30/minute fixed_window")
    stores = [redis_stores(near_cache=False), redis_stores(near_cache=False)]
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(stores[n % 2].check_rate_limits([(spec, "ip1")], 1000.0) for n in range(40)),
            return_exceptions=True,
        ),
        WAIT * 4,
    )
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert sum(1 for o in outcomes if not isinstance(o, BaseException) and o.allowed) == 30
    after = await stores[0].check_rate_limits([(spec, "ip1")], 1000.0)
    assert after.decision is not None
    assert (after.allowed, after.decision.remaining) == (False, 0)


async def test_processes_see_each_others_spending(
    redis_stores: Callable[..., RedisStore],
) -> None:
    spec = rate_limit("shared 10/minute fixed_window")
    mine, other = redis_stores(), redis_stores()
    first = await mine.check_rate_limits([(spec, "ip1")], 1000.0)
    await other.check_rate_limits([(spec, "ip1")], 1000.0)
    second = await mine.check_rate_limits([(spec, "ip1")], 1000.0)

    assert first.decision is not None
    assert second.decision is not None
    assert (first.decision.remaining, second.decision.remaining) == (9, 7)


async def test_a_value_that_is_not_a_state_counts_as_none(
    redis_stores: Callable[..., RedisStore], redis_server: RedisServer
) -> None:
    store = redis_stores()
    spec = rate_limit("per-ip 1/minute gcra")
    client = Redis.from_url(redis_server.url)
    try:
        await client.set(RedisRateLimits(client, store.prefix).key(spec, "ip1"), b"{not json")
    finally:
        await client.aclose()
    assert await admitted(store, spec, "ip1", 1000.0)
    assert not await admitted(store, spec, "ip1", 1000.0)


# -- Redis only: outages -------------------------------------------------------------------------


def every_call(store: RedisStore, now: float) -> list[Callable[[], Awaitable[object]]]:
    """One call of every StateStore method."""
    spec = rate_limit("per-ip 5/minute gcra")
    breaker_spec = circuit_breaker()
    connection = ConnectionLimits("u1", "10.0.0.1", 10, 10, 10)
    return [
        lambda: store.check_rate_limits([(spec, "ip1")], now),
        lambda: store.breaker_acquire(breaker_spec, now),
        lambda: store.breaker_record(breaker_spec, now, failed=False, duration=0.1),
        lambda: store.breaker_release(breaker_spec),
        lambda: store.open_connection(connection),
        lambda: store.close_connection("u1", "10.0.0.1"),
        lambda: store.record_auth_failure("ip:1", 60.0, now),
        lambda: store.auth_failures("ip:1", 60.0, now),
        lambda: store.clear_auth_failures("ip:1"),
        lambda: store.append_replay("c1", "oh_event", {"n": 1}, 10, now, retain=120.0),
        lambda: store.replay_since("c1", 0, 60.0, now),
    ]


async def test_a_stopped_redis_fails_every_call_and_a_restarted_one_serves_again(
    own_redis_server: RedisServer,
) -> None:
    store = RedisStore(own_redis_server.url, prefix="outage")
    try:
        for call in every_call(store, 100.0):
            await asyncio.wait_for(call(), WAIT)
        own_redis_server.stop()
        for call in every_call(store, 101.0):
            started = time.monotonic()
            with pytest.raises(StoreError):
                await asyncio.wait_for(call(), WAIT)
            assert time.monotonic() - started < WAIT
        own_redis_server.start()  # same port, empty, and without the scripts it had loaded
        for call in every_call(store, 102.0):
            await asyncio.wait_for(call(), WAIT)
        replayed = await store.replay_since("c1", 0, 60.0, 102.0)
        assert replayed is not None
        assert [e.event_id for e in replayed] == [1]
    finally:
        await store.close()


async def test_a_redis_that_stops_answering_fails_within_the_socket_timeout(
    own_redis_server: RedisServer,
) -> None:
    store = RedisStore(own_redis_server.url, prefix="hung", socket_timeout=0.2)
    spec = rate_limit("per-ip 5/minute gcra")
    try:
        assert await admitted(store, spec, "ip1", 100.0)
        own_redis_server.pause()
        try:
            for call in every_call(store, 101.0)[:3]:
                with pytest.raises(StoreError):
                    await asyncio.wait_for(call(), WAIT)
        finally:
            own_redis_server.resume()
        assert await asyncio.wait_for(store.auth_failures("ip:9", 60.0, 102.0), WAIT) == (0, 0.0)
        assert await asyncio.wait_for(admitted(store, spec, "ip2", 102.0), WAIT)
    finally:
        await store.close()


async def test_a_key_with_a_lone_surrogate_is_counted_like_any_other(
    redis_stores: Callable[..., RedisStore],
) -> None:
    """A custom key expression may carry client text Redis's UTF-8 cannot hold as is."""
    store = redis_stores()
    spec = rate_limit("per-key 1/minute gcra")
    assert await admitted(store, spec, "k\ud800", 1000.0)
    assert not await admitted(store, spec, "k\ud800", 1000.0)
    assert await admitted(store, spec, "k\udc00", 1000.0)  # another key
