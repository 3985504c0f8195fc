"""Servers sharing a Redis store: one budget for all of them, and outages by the policy.

Real servers on loopback with real clients, and a real ``redis-server`` of the test's own
(see ``redis_server.py``): several servers count against the same limits, a Redis that
goes away is met as the policy's ``on_store_error`` says, and once it is back the same
servers share their state again without a restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import redis
import socketio
from redis_server import RedisServer
from servers import WAIT, Served, echo_app, eventually, policy_path, start_server
from structlog.testing import capture_logs

from policy_engine.cli.main import main
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import BreakerGuard, Engine, conn_context, event_context
from policy_engine.language.contexts import Hook
from policy_engine.server.app import build_app, open_store
from policy_engine.state import redis_breaker_scripts as breaker_scripts
from policy_engine.state.redis_check_then_acquire import CHECK_THEN_ACQUIRE
from policy_engine.state.redis_limits import CHECK
from policy_engine.state.redis_store import RedisStore

LIMIT = 4


def shared_limit(on_store_error: str) -> str:
    return f"""
version: 1
defaults: {{store_timeout: 300ms, on_store_error: {on_store_error}}}
rate_limits:
  - {{name: everyone, hook: event, when: 'event.name == "echo"', key: '"all"',
     limit: {LIMIT}/minute, burst: {LIMIT}}}
"""


@pytest.fixture
def shared_servers(
    tmp_path: Path, own_redis_server: RedisServer, request: pytest.FixtureRequest
) -> Iterator[list[Served]]:
    """Two servers on one Redis store (each its own client connection to it)."""
    mode = getattr(request, "param", "fail_open")
    yield from two_servers(tmp_path, own_redis_server, shared_limit(mode), echo_app)


def two_servers(
    tmp_path: Path, redis: RedisServer, policy_text: str, setup: Any
) -> Iterator[list[Served]]:
    """Two live servers, each with its own RedisStore on ``redis`` (one key prefix)."""
    policy = policy_path(tmp_path, policy_text)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    served = [
        start_server(policy, setup=setup, store=RedisStore(redis.url, prefix=prefix))
        for _ in range(2)
    ]
    yield served
    for one in served:
        asyncio.run_coroutine_threadsafe(one.engine.store.close(), one.live.loop).result(WAIT)
        one.live.stop()


async def connect(served: Served) -> socketio.AsyncClient:
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(served.url, transports=["websocket"], wait_timeout=WAIT)
    return client


async def echo(client: socketio.AsyncClient, n: int) -> Any:
    return await client.call("echo", n, timeout=WAIT)


def refused(answer: Any) -> bool:
    return isinstance(answer, dict) and answer.get("policy") == "rate_limits/everyone"


async def test_servers_sharing_a_store_share_one_budget(shared_servers: list[Served]) -> None:
    first, second = [await connect(served) for served in shared_servers]
    try:
        answers = [await echo(client, n) for n, client in enumerate([first, second] * LIMIT)]
    finally:
        await first.disconnect()
        await second.disconnect()

    assert answers[:LIMIT] == list(range(LIMIT))  # both servers count against the same 4
    assert all(refused(answer) for answer in answers[LIMIT:])
    assert answers[LIMIT]["retry_after_ms"] > 0


async def reconnected(served: Served) -> None:
    """Wait until the server's store answers again (its first call after a restart may
    meet a connection the restart closed, which that call's failure mode then covers)."""
    store = served.engine.store
    assert isinstance(store, RedisStore)
    breaker = served.engine.state.breaker
    for _ in range(100):
        try:
            await served.run(store.ping())
        except Exception:
            await asyncio.sleep(0.05)
            continue
        # The engine's own probe closes its store breaker within a probe interval.
        for _ in range(100):
            if breaker is None or not breaker.is_open:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the store never answered again")


@pytest.mark.parametrize("shared_servers", ["fail_open", "fail_closed", "local"], indirect=True)
async def test_a_redis_outage_follows_on_store_error_then_recovers_by_itself(
    shared_servers: list[Served], own_redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    redis = own_redis_server
    mode = request.node.callspec.params["shared_servers"]
    served = shared_servers[0]
    client = await connect(served)
    try:
        assert await echo(client, 0) == 0  # counted in Redis: 1 of 4

        redis.stop()
        during = [await echo(client, n) for n in range(1, 1 + 2 * LIMIT)]
        redis.start()  # same port, empty: nothing was persisted
        await reconnected(served)
        # The same store, never rebuilt: the shared budget (fresh after the restart)
        # applies again, four more and then refusals, whatever the failure mode.
        after = [await echo(client, n) for n in range(LIMIT + 1)]
    finally:
        await client.disconnect()

    if mode == "fail_open":
        assert during == list(range(1, 1 + 2 * LIMIT))  # nothing refused while Redis is away
    elif mode == "fail_closed":
        assert all(refused(answer) for answer in during)
        # Not a limit the client reached: the store could not judge it.
        assert {answer["code"] for answer in during} == {"STORE_UNAVAILABLE"}
        assert during[0]["retryable"] is True
    else:  # local: this process's own budget stands in, so the limit still holds
        assert during[:LIMIT] == list(range(1, 1 + LIMIT))
        assert all(refused(answer) for answer in during[LIMIT:])
    assert after[:LIMIT] == list(range(LIMIT))
    assert refused(after[LIMIT])


RECOVERY = """
version: 1
defaults: {store_timeout: 2s}  # a loaded machine's slow reply is not what these test
recovery: {enabled: true, max_disconnection: 1m, buffer_events: 100, events: [oh_event]}
"""


def joins_its_conversation(sio: socketio.AsyncServer) -> None:
    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        await sio.enter_room(sid, parse_qs(environ["QUERY_STRING"])["conversation_id"][0])


@pytest.fixture
def recovering_servers(tmp_path: Path, own_redis_server: RedisServer) -> Iterator[list[Served]]:
    yield from two_servers(tmp_path, own_redis_server, RECOVERY, joins_its_conversation)


async def miss_two_events(first: Served, clients: Any, own_ids: bool) -> int:
    """A client sees three events on ``first``, leaves, and two more are sent meanwhile."""
    client, inbox = await clients.connect(first.url, query={"conversation_id": "c1"})
    for n, text in enumerate("abc"):
        await first.emit(
            "oh_event", {"text": text, **({"id": 100 + n} if own_ids else {})}, room="c1"
        )
    await inbox.until(lambda: len(inbox.of("oh_event")) == 3)
    latest = int(inbox.of("oh_event")[-1]["id"])
    await client.disconnect()
    await eventually(lambda: first.adapter.active_connections() == 0)
    for n, text in enumerate("de", start=3):
        await first.emit(
            "oh_event", {"text": text, **({"id": 100 + n} if own_ids else {})}, room="c1"
        )
    return latest


async def come_back(served: Served, clients: Any, latest: int, done: Any) -> Any:
    """Reconnect to ``served`` naming the last event seen; the inbox once ``done(inbox)``."""
    client, inbox = await clients.connect(
        served.url, query={"conversation_id": "c1", "latest_event_id": latest}
    )
    await inbox.until(lambda: done(inbox))
    await client.disconnect()
    return inbox


async def test_a_client_recovers_on_another_server_sharing_the_store(
    recovering_servers: list[Served], clients: Any
) -> None:
    first, second = recovering_servers
    latest = await miss_two_events(first, clients, own_ids=False)

    inbox = await come_back(second, clients, latest, lambda got: len(got.of("oh_event")) == 2)

    assert latest == 3
    assert [(event["text"], event["id"]) for event in inbox.of("oh_event")] == [("d", 4), ("e", 5)]
    assert any(event == "recovered" for event, _, _ in second.observer.connections)


async def test_ids_only_the_application_knows_are_not_guessed_on_another_server(
    recovering_servers: list[Served], clients: Any
) -> None:
    first, second = recovering_servers
    latest = await miss_two_events(first, clients, own_ids=True)

    inbox = await come_back(second, clients, latest, lambda got: bool(got.of("policy_error")))

    assert latest == 102
    assert inbox.of("oh_event") == []
    assert inbox.of("policy_error")[0]["code"] == "RECOVERY_UNAVAILABLE"


async def test_an_outage_is_logged_once_counted_in_metrics_and_its_end_logged(
    tmp_path: Path, own_redis_server: RedisServer
) -> None:
    policy = policy_path(tmp_path, shared_limit("fail_open"))
    store = RedisStore(own_redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    server = build_app(socketio.AsyncServer(async_mode="asgi"), policy, store=store)
    engine = server.engine
    client = conn_context(sid="s1", ip="192.0.2.1")

    async def decide() -> str:
        return (await engine.on_event(client, {}, event_context("echo"))).outcome.value

    def metric(name: str) -> float | None:
        return server.metrics.registry.get_sample_value(f"policy_engine_{name}")

    try:
        with capture_logs() as logs:
            healthy = await decide()
            own_redis_server.stop()
            during = [await decide() for _ in range(3)]
            await eventually(lambda: not engine.store_health.available)  # the probe failed
            down, failures = metric("store_up"), metric("store_failures_total")
            own_redis_server.start()
            # Three failures opened the store breaker; its probe finds Redis again.
            assert engine.state.breaker is not None
            assert engine.state.breaker.is_open
            await eventually(lambda: engine.store_health.available)
            after = await decide()
    finally:
        await store.close()

    assert (healthy, during, after) == ("allow", ["allow"] * 3, "allow")  # fail_open
    assert (down, failures) == (0.0, 3.0)
    assert metric("store_up") == 1.0
    events = [entry["event"] for entry in logs if entry["event"].startswith("store.")]
    assert events == ["store.unavailable", "store.recovered"]
    assert (await server.status())["store"] == {
        "kind": "RedisStore",
        "available": True,
        "failures": 3,
        "on_store_error": "fail_open",
    }


BREAKER = """
version: 1
defaults: {store_timeout: 300ms}
circuit_breakers:
  - {name: agent, match: 'event.name == "run"', failure_rate: 50%, window: {calls: 2},
     minimum_calls: 2, open_for: 30s}
"""


async def test_status_reads_breaker_states_from_the_shared_store(
    tmp_path: Path, own_redis_server: RedisServer
) -> None:
    store = RedisStore(own_redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    policy = policy_path(tmp_path, BREAKER)
    server = build_app(socketio.AsyncServer(async_mode="asgi"), policy, store=store)
    engine = server.engine
    client, event = conn_context(sid="s1", ip="192.0.2.1"), event_context("run")
    try:
        closed = await server.breaker_states()
        for _ in range(2):
            guard = await engine.before_call(client, {}, event)
            assert isinstance(guard, BreakerGuard)
            failure = engine.on_error(RuntimeError("agent down"), Hook.EVENT)[0]
            await engine.after_call(guard, client, event, failure, {})
        opened = await server.breaker_states()
        own_redis_server.stop()
        unknown = await server.breaker_states()
    finally:
        await store.close()

    assert (closed, opened, unknown) == (
        {"agent": "closed"},
        {"agent": "open"},
        {"agent": "unknown"},
    )


def test_engines_on_a_shared_store_read_the_wall_clock() -> None:
    policy = compile_text("version: 1\n").policy
    assert Engine(policy).clock is time.monotonic
    assert Engine(policy, RedisStore("redis://127.0.0.1:1/0")).clock is time.time


def test_the_store_url_chooses_the_store() -> None:
    assert open_store(None) is None
    assert open_store("memory") is None
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    with pytest.raises(ValueError, match="unknown state store"):
        open_store("mongodb://somewhere")


@pytest.mark.usefixtures("restore_logging")
def test_serve_refuses_an_unknown_store_before_starting(tmp_path: Path, capsys: Any) -> None:
    policy = policy_path(tmp_path, "version: 1\n")
    code = main(["serve", "--policies", str(policy), "--store", "mongodb://somewhere"])
    assert code == 2
    assert "unknown state store" in capsys.readouterr().err


CEILINGS = """
version: 1
defaults: {{store_timeout: 300ms, on_store_error: {mode}}}
connections: {{max_per_user: 1, retry_after: 2s}}
circuit_breakers:
  - {{name: agent, match: 'event.name == "run"', failure_rate: 50%, window: {{calls: 4}},
     minimum_calls: 4, open_for: 30s}}
"""


def engine_on(redis: RedisServer, mode: str) -> Engine:
    policy = compile_text(CEILINGS.format(mode=mode)).policy
    store = RedisStore(redis.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    return Engine(policy, store)


def user(sid: str, name: str = "ada") -> dict[str, Any]:
    return conn_context(sid=sid, ip="192.0.2.1", user_id=name)


async def test_a_connection_let_in_uncounted_is_not_released_from_the_shared_count(
    own_redis_server: RedisServer,
) -> None:
    engine = engine_on(own_redis_server, "fail_open")
    try:
        own_redis_server.stop()
        outage = await engine.on_connect(user("a"), {})  # let in, counted nowhere
        own_redis_server.start()
        await engine.store.ping()  # type: ignore[attr-defined]
        second = await engine.on_connect(user("b"), {})  # the user's one connection
        await engine.on_disconnect(user("a"))  # must not release b's count
        third = await engine.on_connect(user("c"), {})
    finally:
        await engine.store.close()

    assert (outage.outcome, second.outcome) == (Outcome.ALLOW, Outcome.ALLOW)
    assert (third.outcome, third.rule) == (Outcome.REJECT, "connections/max_per_user")


async def test_connection_ceilings_and_breakers_follow_on_store_error(
    own_redis_server: RedisServer,
) -> None:
    engines = {mode: engine_on(own_redis_server, mode) for mode in ("fail_closed", "local")}
    own_redis_server.stop()
    try:
        closed = await engines["fail_closed"].on_connect(user("a"), {})
        permit = await engines["fail_closed"].before_call(user("a"), {}, event_context("run"))
        local = engines["local"]
        first = await local.on_connect(user("a"), {})
        second = await local.on_connect(user("b"), {})  # counted locally: over the ceiling
        await local.on_disconnect(user("a"))  # released locally
        third = await local.on_connect(user("c"), {})
    finally:
        for engine in engines.values():
            await engine.store.close()

    assert (closed.outcome, closed.rule) == (Outcome.REJECT, "connections/store_unavailable")
    assert closed.payload is not None
    assert closed.payload["retry_after_ms"] == 2000
    # A store that cannot count now may count in a moment: retry, with the advised backoff.
    assert closed.payload["retryable"] is True
    assert closed.payload["backoff"] is not None
    assert isinstance(permit, Decision)
    assert permit.rule == "circuit_breakers/agent"
    assert (first.outcome, second.outcome, third.outcome) == (
        Outcome.ALLOW,
        Outcome.REJECT,
        Outcome.ALLOW,
    )


GUARDED = """
version: 1
defaults: {store_timeout: 2s, on_store_error: fail_closed}
rate_limits:
  - {name: everyone, hook: event, when: 'event.name == "echo"', key: '"all"',
     limit: 2/minute, burst: 2}
circuit_breakers:
  - {name: echo-backend, match: 'event.name == "echo"', failure_rate: 50%,
     window: {calls: 10}, minimum_calls: 10, open_for: 30s, half_open_calls: 1}
"""


async def test_limits_and_permit_are_one_script_and_refused_events_take_no_permit(
    tmp_path: Path, own_redis_server: RedisServer
) -> None:
    store = RedisStore(own_redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    with redis.Redis.from_url(own_redis_server.url) as loader:  # no NOSCRIPT reload counted
        scripts = breaker_scripts.ACQUIRE, breaker_scripts.RECORD_MANY, breaker_scripts.RELEASE
        for source in (CHECK, CHECK_THEN_ACQUIRE, *scripts):
            loader.script_load(source)
    served = start_server(policy_path(tmp_path, GUARDED), setup=echo_app, store=store)
    pipeline = store._pipeline
    client = await connect(served)
    try:
        trips = []
        answers = []
        for n in range(3):
            before = (pipeline.batches, pipeline.calls)
            answers.append(await echo(client, n))
            calls = 2 if n < 2 else 1  # the outcome of an admitted event is recorded after
            await eventually(lambda since=before[1], calls=calls: pipeline.calls - since >= calls)
            trips.append((pipeline.batches - before[0], pipeline.calls - before[1]))
        before = (pipeline.batches, pipeline.calls)
        answers.append(await echo(client, 3))  # refused by the near cache: nothing asked
        trips.append((pipeline.batches - before[0], pipeline.calls - before[1]))
        breaker = await served.run(store.fetch_breaker_state("echo-backend"))
    finally:
        await client.disconnect()
        await served.run(store.close())
        served.live.stop()

    assert answers[:2] == [0, 1]
    assert refused(answers[2])
    # Admitted: the limit and the permit in one script, then the outcome: 2 calls, 2 batches.
    assert trips[:2] == [(2, 2), (2, 2)]
    # Refused by the limit: the same one script, which took no permit (none to hand back).
    assert trips[2] == (1, 1)
    # Refused again while the key is over its limit: the near cache answers, no permit asked.
    assert refused(answers[3])
    assert trips[3] == (0, 0)
    assert breaker.window is not None
    assert (breaker.window.calls, breaker.permits) == (2, 0)


DELAYED = """
version: 1
defaults: {store_timeout: 2s}
shedding:
  - {name: slow-down, hook: event, when: 'load.loop_lag_ms >= 0 && event.name == "echo"',
     action: delay, delay: 1ms, max_priority: normal}
rate_limits:
  - {name: watch, hook: event, when: 'event.name == "echo"', key: '"all"', limit: 1/minute,
     mode: shadow}
circuit_breakers:
  - {name: echo-backend, match: 'event.name == "echo"', failure_rate: 50%,
     window: {calls: 10}, minimum_calls: 10, open_for: 30s, half_open_calls: 1}
"""


async def test_a_delayed_event_on_a_shared_store_is_judged_once(
    tmp_path: Path, own_redis_server: RedisServer
) -> None:
    store = RedisStore(own_redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    served = start_server(policy_path(tmp_path, DELAYED), setup=echo_app, store=store)
    client = await connect(served)
    try:
        answers = [await echo(client, n) for n in range(2)]
    finally:
        await client.disconnect()
        await served.run(store.close())
        served.live.stop()

    decisions = [d for hook, d, _ in served.observer.decisions if hook == "event"]
    assert answers == [0, 1]
    assert [d.outcome for d in decisions] == [Outcome.DELAY, Outcome.DELAY]
    # The second is over the shadow limit: reported once, not once per judgement.
    assert [d.shadowed for d in decisions] == [(), ("rate_limits/watch",)]
