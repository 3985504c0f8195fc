"""Store URLs to redis-py clients: one Redis, a Redis Cluster, or a Redis behind Sentinel.

=============================================================  ==============================
``redis://host:port/db``, ``rediss://...``, ``unix:///path``  one Redis (redis-py's forms)
``redis+cluster://host:port[,host:port...][/0]``              a Redis Cluster, found from
                                                               any of the nodes named
``redis+sentinel://host:port[,host:port...]/service[/db]``    the master the Sentinels name
                                                               ``service``, followed across
                                                               failovers
=============================================================  ==============================

Every form takes redis-py's query options (``?socket_timeout=0.2``, ...) and a
``user:password@`` before the hosts: for a cluster, the nodes' credentials; for Sentinel,
the master's (the Sentinels are asked without). Query options override the defaults here.
The store's own options (:data:`STORE_OPTIONS`: ``lease_ttl``, ``pipeline_window``,
``pipeline_limit``) may be given the same way; :func:`store_options` takes them out before
redis-py reads the URL.

Every client is built with the same policy as the single Redis one: ``socket_timeout``
bounds connecting and every reply, and redis-py retries nothing, since a command retried
after a lost reply could count twice. A Redis Cluster client still follows ``MOVED`` and
``ASK`` redirections (the command did not run), and a Sentinel client asks the Sentinels
for the master again on its next connection once the one it knew refused a write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

RedisClient = Redis | RedisCluster
"""What the store's parts run their scripts on."""

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
SCHEMES = ("redis", "rediss", "unix", CLUSTER_SCHEME, SENTINEL_SCHEME)


STORE_OPTIONS = {"lease_ttl": float, "pipeline_window": float, "pipeline_limit": int}
"""Query options of a store URL that are the store's, not redis-py's, and their types."""


def store_options(url: str) -> tuple[str, dict[str, float]]:
    """The URL without the store's own query options, and those options; raises ValueError
    for one that is not a number."""
    parts = urlsplit(url)
    kept, options = [], {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        kind = STORE_OPTIONS.get(name)
        if kind is None:
            kept.append((name, value))
            continue
        try:
            options[name] = kind(value)
        except ValueError as exc:
            raise ValueError(f"store option {name}={value!r} is not a number") from exc
    return urlunsplit(parts._replace(query=urlencode(kept))), options


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis store in one of the forms above."""
    return urlsplit(url).scheme in SCHEMES


@dataclass(frozen=True, slots=True)
class Connected:
    """A client made from a URL, with the Sentinel connections it asks (if any)."""

    client: RedisClient
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        finally:
            if self.sentinel is not None:
                await self.sentinel.aclose()


def connect(url: str, *, socket_timeout: float) -> Connected:
    """The client ``url`` names; raises ValueError for a URL it cannot use.

    Nothing is connected yet: the first command connects (and finds the cluster's nodes
    or asks the Sentinels).
    """
    defaults: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    parts = urlsplit(url)
    if parts.scheme == CLUSTER_SCHEME:
        return Connected(_cluster(parts, defaults))
    if parts.scheme == SENTINEL_SCHEME:
        sentinel, client = _sentinel(parts, defaults)
        return Connected(client, sentinel)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"not a Redis URL: {url!r} (schemes: {', '.join(SCHEMES)})")
    return Connected(Redis.from_url(url, **defaults))


def _cluster(parts: SplitResult, defaults: dict[str, Any]) -> RedisCluster:
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {parts.path!r}")
    addresses = _addresses(parts)
    options = {**defaults, **_options(parts, "")}
    if options.pop("db", 0) != 0:
        raise ValueError("a Redis Cluster has database 0 only")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in addresses], **options
    )


def _sentinel(parts: SplitResult, defaults: dict[str, Any]) -> tuple[Sentinel, Redis]:
    path = [piece for piece in parts.path.split("/") if piece]
    if not 1 <= len(path) <= 2:
        raise ValueError(
            f"a Sentinel URL names the service, and the database if not 0: "
            f"redis+sentinel://host:port/service[/db], not {parts.path!r}"
        )
    service, db = path[0], path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"not a database number: {db!r}")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        _addresses(parts),
        sentinel_kwargs={**defaults},
        **{**defaults, **_options(parts, db)},
    )
    return sentinel, sentinel.master_for(service)


def _addresses(parts: SplitResult) -> list[tuple[str, int]]:
    """The ``host:port`` list between the credentials and the path."""
    hosts = parts.netloc.rpartition("@")[2]
    addresses = []
    for address in hosts.split(","):
        node = urlsplit(f"//{address}")
        try:
            port = node.port
        except ValueError as exc:
            raise ValueError(f"not a host:port: {address!r}") from exc
        if not node.hostname or port is None:
            raise ValueError(f"not a host:port: {address!r}")
        addresses.append((node.hostname, port))
    return addresses


def _options(parts: SplitResult, db: str) -> dict[str, Any]:
    """The credentials and query options, read as redis-py reads them in a redis:// URL."""
    credentials = parts.netloc.rpartition("@")[0]
    at = f"{credentials}@" if credentials else ""
    query = f"?{parts.query}" if parts.query else ""
    options: dict[str, Any] = dict(parse_url(f"redis://{at}localhost/{db}{query}"))
    del options["host"]
    return options


def pubsub_url(url: str) -> tuple[str, int]:
    """The URL python-socketio's Redis manager takes for the Redis a store URL names, and
    its database: a Cluster is reached through its first node (a publish on any node
    reaches the subscribers of all), a Sentinel URL is written the manager's way
    (``redis+sentinel://hosts/db/service``)."""
    url = store_options(url)[0]
    parts = urlsplit(url)
    if parts.scheme == CLUSTER_SCHEME:
        credentials = parts.netloc.rpartition("@")[0]
        at = f"{credentials}@" if credentials else ""
        host, port = _addresses(parts)[0]
        return f"redis://{at}{host}:{port}/0", 0
    if parts.scheme == SENTINEL_SCHEME:
        path = [piece for piece in parts.path.split("/") if piece]
        service, number = path[0], path[1] if len(path) == 2 else "0"
        return f"redis+sentinel://{parts.netloc}/{number}/{service}", int(number)
    return url, int(parse_url(url).get("db", 0))
