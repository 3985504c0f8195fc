"""The guarded store: one place for store timeouts, health and ``on_store_error``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from servers import eventually

from policy_engine.compiler.pipeline import compile_text
from policy_engine.language.model import StoreFailureMode
from policy_engine.state.guarded import ASK, STORE_UNAVAILABLE, GuardedStore
from policy_engine.state.memory import MemoryStore
from policy_engine.state.protocol import ConnectionLimits

LIMITS = ConnectionLimits("alice", "192.0.2.1", 10, 2, 5)
RULES = compile_text(
    "version: 1\nrate_limits:\n"
    "  - {name: shared, hook: event, key: conn.sid, limit: 1/second, burst: 1}\n"
    "  - {name: mine, hook: event, key: conn.sid, limit: 1/second, burst: 1, scope: local}\n"
).policy.rate_limits


class SlowStore:
    """A shared store that answers nothing in time, as a Redis behind a dead link."""

    def __getattr__(self, name: str) -> Any:
        async def hang(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(10)

        return hang


class Answering:
    """A shared store that answers: a memory store reached only through the protocol."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def guarded(store: Any, mode: StoreFailureMode) -> GuardedStore:
    state = GuardedStore(store)
    state.configure(0.01, mode)
    return state


@pytest.mark.parametrize(
    ("mode", "ceiling", "counted_locally"),
    [
        (StoreFailureMode.FAIL_OPEN, None, 0),
        (StoreFailureMode.FAIL_CLOSED, STORE_UNAVAILABLE, 0),
        (StoreFailureMode.LOCAL, None, 1),
    ],
)
async def test_a_late_store_is_skipped_by_policy_and_told_to_health_once(
    mode: StoreFailureMode, ceiling: str | None, counted_locally: int
) -> None:
    state = guarded(SlowStore(), mode)
    heard: list[bool] = []
    state.health.listeners.append(lambda available, detail: heard.append(available))

    assert await state.open_connection("s1", LIMITS) == ceiling
    assert await state.open_connection("s2", LIMITS) == ceiling
    assert await state.auth_failures("k", 60.0, 0.0) == (0, 0.0)
    # Three late calls make the store suspect; its probe (a ping that hangs too) confirms.
    await eventually(lambda: heard == [False])

    assert state.local.connection_counts()[0] == 2 * counted_locally
    assert state.health.failures == 3
    assert state.status()["available"] is False
    assert state.breaker is not None
    await state.breaker.close()  # its probe would go on: the store never answers


async def test_a_disconnect_releases_the_count_where_the_connect_was_counted() -> None:
    state = guarded(SlowStore(), StoreFailureMode.LOCAL)
    await state.open_connection("s1", LIMITS)
    assert state.local.connection_counts() == (1, 1, 1)

    await state.close_connection("s1", "alice", "192.0.2.1")
    await state.close_connection("s1", "alice", "192.0.2.1")  # released once only

    assert state.local.connection_counts() == (0, 0, 0)


async def test_only_what_lives_in_this_process_is_answered_without_io() -> None:
    shared, mine = RULES
    remote = guarded(Answering(), StoreFailureMode.FAIL_OPEN)
    alone = guarded(None, StoreFailureMode.FAIL_OPEN)

    assert remote.rate_now(shared, "k", 100.0) is ASK
    assert remote.rates_now([(mine, "k"), (shared, "k")], 100.0) is ASK
    assert remote.rate_now(mine, "k", 100.0) is not ASK
    assert alone.rate_now(shared, "k", 100.0) is not ASK
    assert remote.local.rate_keys("shared") == 0  # asking consumed nothing

    decided = await remote.rates([(shared, "k")], 100.0)
    refused = await remote.rates([(shared, "k")], 100.0)

    assert decided.allowed
    assert not refused.allowed
    assert remote.store.inner.rate_keys("shared") == 1  # type: ignore[attr-defined]


async def test_replay_buffers_that_fail_cost_recovery_not_the_caller() -> None:
    state = guarded(SlowStore(), StoreFailureMode.FAIL_CLOSED)

    assert await state.append_replay("c1", "message", {"text": "hi"}, 10, 100.0) is None
    assert await state.replay_since("c1", 0, 60.0, 100.0) is None
    assert state.health.failures == 2
