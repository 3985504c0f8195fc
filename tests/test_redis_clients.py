"""Store URLs to clients: what each form builds, and the URLs refused (no server needed;
``test_store_cluster.py`` and ``test_store_sentinel.py`` use the clients on real ones)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from policy_engine.server.app import open_store
from policy_engine.state.redis_clients import (
    Connected,
    connect,
    is_redis_url,
    pubsub_url,
    store_options,
)
from policy_engine.state.redis_store import RedisStore


async def closed(connected: Connected) -> Connected:
    await connected.aclose()
    return connected


async def test_a_cluster_url_names_its_startup_nodes_and_keeps_the_store_policy() -> None:
    connected = await closed(
        connect("redis+cluster://ann:secret@127.0.0.1:7000,[::1]:7001", socket_timeout=0.5)
    )
    client = connected.client
    assert isinstance(client, RedisCluster)
    assert connected.sentinel is None
    assert set(client.nodes_manager.startup_nodes) == {"127.0.0.1:7000", "::1:7001"}
    assert client.retry.get_retries() == 0
    for node in client.nodes_manager.startup_nodes.values():
        options: dict[str, Any] = node.connection_kwargs
        assert (options["socket_timeout"], options["socket_connect_timeout"]) == (0.5, 0.5)
        assert (options["username"], options["password"]) == ("ann", "secret")


async def test_query_options_override_the_defaults() -> None:
    connected = await closed(
        connect("redis+cluster://127.0.0.1:7000/0?socket_timeout=0.2", socket_timeout=0.5)
    )
    assert isinstance(connected.client, RedisCluster)
    node = next(iter(connected.client.nodes_manager.startup_nodes.values()))
    assert node.connection_kwargs["socket_timeout"] == 0.2
    assert node.connection_kwargs["socket_connect_timeout"] == 0.5


async def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    connected = await closed(
        connect("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380/cache/2", socket_timeout=0.3)
    )
    client, sentinel = connected.client, connected.sentinel
    assert isinstance(client, Redis)
    assert sentinel is not None
    asked = [s.connection_pool.connection_kwargs for s in sentinel.sentinels]
    assert [(o["host"], o["port"]) for o in asked] == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert all(o["socket_timeout"] == 0.3 and o.get("password") is None for o in asked)
    pool = client.connection_pool
    assert pool.service_name == "cache"  # type: ignore[attr-defined]
    options = pool.connection_kwargs
    assert (options["db"], options["password"], options["socket_timeout"]) == (2, "pw", 0.3)
    assert options["retry"].get_retries() == 0


async def test_a_plain_url_is_one_redis_as_before() -> None:
    connected = await closed(connect("redis://127.0.0.1:6390/3", socket_timeout=0.4))
    assert isinstance(connected.client, Redis)
    options = connected.client.connection_pool.connection_kwargs
    assert (options["port"], options["db"], options["socket_timeout"]) == (6390, 3, 0.4)
    assert options["retry"].get_retries() == 0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://127.0.0.1", "not a host:port"),
        ("redis+cluster://127.0.0.1:7000,", "not a host:port"),
        ("redis+cluster://127.0.0.1:notaport", "not a host:port"),
        ("redis+cluster://127.0.0.1:7000/3", "database 0 only"),
        ("redis+cluster://127.0.0.1:7000/?db=1", "database 0 only"),
        ("redis+sentinel://127.0.0.1:26379", "names the service"),
        ("redis+sentinel://127.0.0.1:26379/cache/two", "not a database number"),
        ("redis+sentinel://127.0.0.1:26379/cache/0/more", "names the service"),
    ],
)
def test_urls_the_store_cannot_use_are_refused_before_anything_connects(
    url: str, reason: str
) -> None:
    assert is_redis_url(url)
    with pytest.raises(ValueError, match=reason):
        open_store(url)


def test_other_schemes_are_not_redis() -> None:
    assert not is_redis_url("memcached://127.0.0.1:11211")
    with pytest.raises(ValueError, match="unknown state store"):
        open_store("redis+memory://127.0.0.1:1")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/3", ("redis://127.0.0.1:6379/3", 3)),
        ("redis+cluster://u:p@a:1,b:2", ("redis://u:p@a:1/0", 0)),
        ("redis+sentinel://h:1,h:2/mymaster/2", ("redis+sentinel://h:1,h:2/2/mymaster", 2)),
        ("redis+sentinel://h:1/mymaster", ("redis+sentinel://h:1/0/mymaster", 0)),
        ("redis://h:1/2?lease_ttl=5&socket_timeout=1", ("redis://h:1/2?socket_timeout=1", 2)),
    ],
)
def test_the_socketio_manager_reaches_the_same_redis(url: str, expected: tuple[str, int]) -> None:
    assert pubsub_url(url) == expected


async def test_the_stores_own_options_in_the_url_are_taken_out_before_redis_py_reads_it() -> None:
    url = "redis://127.0.0.1:6390/1?lease_ttl=4.5&pipeline_window=0.0002&socket_timeout=0.3"
    assert store_options(url) == (
        "redis://127.0.0.1:6390/1?socket_timeout=0.3",
        {"lease_ttl": 4.5, "pipeline_window": 0.0002},
    )
    store = RedisStore(f"{url}&pipeline_limit=16")
    try:
        assert store._connections.lease_ttl == 4.5
        assert (store._pipeline.window, store._pipeline.limit) == (0.0002, 16)
        assert store._client.connection_pool.connection_kwargs["socket_timeout"] == 0.3
    finally:
        await store.close()
    with pytest.raises(ValueError, match="lease_ttl"):
        store_options("redis://h:1/0?lease_ttl=soon")
