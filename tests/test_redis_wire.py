"""The store's own connection to a plain Redis: many pipelines in flight on one connection,
replies matched in order, one timer for them all, sign-in and database from the URL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from uuid import uuid4

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_server import RedisServer
from test_store import rate_limit

from policy_engine.errors import StoreError
from policy_engine.state.redis_pipeline import Call, Pipeline
from policy_engine.state.redis_store import RedisStore
from policy_engine.state.redis_wire import Wire, wire_for

ECHO = "return ARGV[1]"


def echo_pipeline(store: RedisStore) -> tuple[Pipeline, Call]:
    script = store._client.register_script(ECHO)
    return store._pipeline, Call(script, ["k"], ["?"])


async def test_a_plain_url_speaks_over_the_stores_own_connection(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    try:
        assert isinstance(store._pipeline.wire, Wire)
    finally:
        await store.close()


async def test_thousands_of_calls_in_many_batches_each_get_their_own_reply(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, pipeline_limit=7)  # many batches in flight at once
    pipeline, call = echo_pipeline(store)
    try:
        replies = await asyncio.gather(
            *(pipeline.run(Call(call.script, call.keys, [f"n{n}"])) for n in range(3000))
        )
    finally:
        await store.close()
    assert replies == [f"n{n}".encode() for n in range(3000)]
    assert pipeline.batches >= 3000 // 7


async def test_a_script_redis_forgot_is_loaded_once_for_every_call_that_met_it(
    own_redis_server: RedisServer,
) -> None:
    store = RedisStore(own_redis_server.url)
    pipeline, call = echo_pipeline(store)
    try:
        calls = [Call(call.script, call.keys, [str(n)]) for n in range(50)]
        assert await asyncio.gather(*map(pipeline.run, calls)) == [b"%d" % n for n in range(50)]
        with own_redis_server.client() as client:
            loads = client.info("commandstats")["cmdstat_script|load"]["calls"]
            client.script_flush()
        assert loads == 1
        assert await asyncio.gather(*map(pipeline.run, calls)) == [b"%d" % n for n in range(50)]
        with own_redis_server.client() as client:
            assert client.info("commandstats")["cmdstat_script|load"]["calls"] == 2
    finally:
        await store.close()


async def test_a_hung_redis_fails_the_calls_in_flight_and_a_late_reply_answers_nothing(
    own_redis_server: RedisServer,
) -> None:
    store = RedisStore(own_redis_server.url)
    assert store.answer_within(0.2)
    pipeline, call = echo_pipeline(store)
    try:
        assert await pipeline.run(Call(call.script, call.keys, ["before"])) == b"before"
        own_redis_server.pause()
        started = time.monotonic()
        late = [pipeline.run(Call(call.script, call.keys, [f"late{n}"])) for n in range(20)]
        outcomes = await asyncio.gather(*late, return_exceptions=True)
        waited = time.monotonic() - started
        own_redis_server.resume()
        failed = (RedisTimeoutError, RedisConnectionError)
        assert all(isinstance(outcome, failed) for outcome in outcomes), outcomes
        assert waited < 2.0  # within the timeout and one look of the timer, not forever
        # The paused Redis ran the late calls once resumed; their replies went nowhere.
        assert await pipeline.run(Call(call.script, call.keys, ["after"])) == b"after"
    finally:
        await store.close()


async def test_a_late_call_through_the_store_is_a_store_error(
    own_redis_server: RedisServer,
) -> None:
    store = RedisStore(own_redis_server.url)
    store.answer_within(0.1)
    spec = rate_limit("per-ip 5/minute gcra")
    try:
        await store.check_rate_limits([(spec, "ip1")], 100.0)
        own_redis_server.pause()
        with pytest.raises(StoreError):
            await store.check_rate_limits([(spec, "ip1")], 100.0)
    finally:
        own_redis_server.resume()
        await store.close()


ACL = "user app on >s3cret ~* &* +@all\n"


async def test_the_urls_user_password_and_database_are_used(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", config=ACL)
    server.start()
    prefix = f"t-{uuid4().hex}"
    spec = rate_limit("per-ip 5/minute gcra")
    url = f"redis://app:s3cret@127.0.0.1:{server.port}/3"
    try:
        store = RedisStore(url, prefix=prefix)
        assert isinstance(store._pipeline.wire, Wire)
        decision = await store.check_rate_limits([(spec, "ip1")], 100.0)
        await store.close()
        assert decision.allowed
        with server.client() as client:
            assert client.dbsize() == 0  # nothing in database 0
            client.select(3)
            assert [key.decode() for key in client.keys(f"{prefix}:*")] == [
                store._limits.key(spec, "ip1")
            ]
        wrong = RedisStore(f"redis://app:wrong@127.0.0.1:{server.port}/3", prefix=prefix)
        for _ in range(5):
            with pytest.raises(StoreError, match=r"(?i)password|auth"):
                await wrong.check_rate_limits([(spec, "ip1")], 100.0)
        await asyncio.sleep(0.1)  # the refused connections' closes reach the server
        with server.client() as client:
            assert len(client.client_list()) == 1  # this one: none of the refused is left
        await wrong.close()
    finally:
        server.stop()


async def test_a_unix_socket_url_is_spoken_to_directly(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path / "redis", options=["--unixsocket", str(path)])
    server.start()
    spec = rate_limit("per-ip 1/minute gcra")
    try:
        store = RedisStore(f"unix://{path}", prefix=f"t-{uuid4().hex}")
        assert wire_for(store._client, 0.5) is not None
        first = await store.check_rate_limits([(spec, "ip1")], 100.0)
        second = await store.check_rate_limits([(spec, "ip1")], 100.0)
        await store.close()
        assert (first.allowed, second.allowed) == (True, False)
    finally:
        server.stop()


def test_clients_the_wire_cannot_speak_for_keep_redis_pys_connections() -> None:
    assert wire_for(Redis.from_url("rediss://127.0.0.1:6390/0"), 0.5) is None
    assert wire_for(Redis.from_url("redis://127.0.0.1:6390/0"), 0.5) is not None
