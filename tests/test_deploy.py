"""The documented deployment, for real: Redis, two ``policy-engine serve`` processes, HAProxy.

The processes run the demo app with ``--store`` the Redis URL, exactly as
``deploy/README.md`` starts them, and HAProxy runs the shipped ``deploy/haproxy.cfg``.
Python-socketio clients go through HAProxy over long-polling (which only works when every
request of a session reaches the same process) and over WebSocket; clients connected to
each process directly check what the two share: an emit made in one reaches the clients of
the other, through the Redis client manager ``serve`` installs, and a rate limit counts
the events of both.

One deployment serves the whole module (starting it is most of the cost); every test uses
conversations of its own. The HAProxy tests skip without ``haproxy`` unless
``POLICY_ENGINE_REQUIRE_HAPROXY=1``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import socketio
from cluster import HAProxy, ServeProcess, stop_all
from redis.asyncio import Redis
from redis_server import RedisServer

CHANNEL = "policy-engine:socketio:0"  # the store's default prefix, database 0
WAIT = 10.0  # a bound on waiting for what normally takes milliseconds, not a timing check
LIMIT = 4

# As deploy/README.md says: believe HAProxy's X-Forwarded-For. The limit applies to the
# conversations named "limited-..." only, so that the other tests may send what they like.
# A busy machine must not turn a slow Redis reply into a decision made without Redis: the
# store gets far longer than the shipped 20 ms, and would be refused rather than bypassed.
POLICY = f"""\
version: 1
defaults:
  store_timeout: 5s
  on_store_error: fail_closed
identity:
  trusted_proxies: [127.0.0.1/32]
rate_limits:
  - name: actions-per-conversation
    hook: event
    when: event.name == "oh_user_action" && conn.conversation_id.startsWith("limited-")
    key: conn.conversation_id
    limit: {LIMIT}/hour
"""


@dataclass
class Deployment:
    redis: RedisServer
    a: ServeProcess
    b: ServeProcess


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("deployment")
    redis = RedisServer(directory / "redis")
    redis.start()
    policies = directory / "policies.yaml"
    policies.write_text(POLICY, encoding="utf-8")
    processes = [ServeProcess(name, directory, policies, redis.url) for name in ("a", "b")]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_until_ready()
        yield Deployment(redis, *processes)
    finally:
        stop_all(processes)
        redis.stop()


@pytest.fixture(scope="module")
def balancer(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    haproxy = HAProxy(tmp_path_factory.mktemp("haproxy"), [deployment.a, deployment.b])
    try:
        haproxy.start()
        yield haproxy.url
    finally:
        haproxy.stop()


@dataclass
class Client:
    sio: socketio.AsyncClient
    events: asyncio.Queue[dict[str, Any]]
    errors: asyncio.Queue[dict[str, Any]]

    async def act(self, action: str = "message") -> Any:
        return await self.sio.call("oh_user_action", {"action": action}, timeout=WAIT)

    async def next_event(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.events.get(), WAIT)


@asynccontextmanager
async def connected(
    url: str, conversation: str, transports: list[str] | None = None
) -> AsyncIterator[Client]:
    """A python-socketio client in ``conversation``, disconnected on the way out.

    It keeps cookies, as a browser does, so HAProxy's stickiness cookie comes back with
    every request (aiohttp drops cookies of an IP address unless told otherwise).
    """
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    sio = socketio.AsyncClient(reconnection=False, http_session=session)
    client = Client(sio, asyncio.Queue(), asyncio.Queue())
    sio.on("oh_event", client.events.put)
    sio.on("policy_error", client.errors.put)
    try:
        await sio.connect(
            f"{url}?conversation_id={conversation}",
            transports=transports or ["websocket"],
            wait_timeout=WAIT,
        )
        yield client
    finally:
        if sio.transport() == "polling":
            await abandon(sio, session)
        else:
            await sio.disconnect()
        await session.close()


async def abandon(sio: socketio.AsyncClient, session: aiohttp.ClientSession) -> None:
    """Leave a long-polling connection without waiting for its pending GET.

    python-engineio's client (4.15) ends its write loop before the close packet it queues
    is sent, then waits for the pending poll until its own timeout (30 s). Closing the HTTP
    session ends that request at once; the server drops the session at its ping timeout.
    """
    reading = sio.eio.read_loop_task
    await sio.eio.disconnect(abort=True)
    await session.close()
    if reading is not None:
        await asyncio.wait_for(reading, WAIT)


async def eventually(check: Any, what: str) -> None:
    for _ in range(int(WAIT / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def status(process: ServeProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{process.ops_url}/status", timeout=WAIT) as response:
        report: dict[str, Any] = json.load(response)
        return report


# -- through HAProxy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transports",
    [["polling"], ["websocket"], ["polling", "websocket"]],
    ids=["long-polling", "websocket", "upgrade"],
)
async def test_clients_through_haproxy_connect_and_get_answers(
    balancer: str, transports: list[str]
) -> None:
    conversation = f"through-{'-'.join(transports)}"
    async with connected(balancer, conversation, transports) as client:
        for _ in range(3):
            ack = await client.act()
            assert ack["ok"] is True
            event = await client.next_event()
            assert event["conversation_id"] == conversation
            assert event["id"] == ack["id"]

        if transports == ["polling", "websocket"]:

            async def upgraded() -> bool:
                return bool(client.sio.transport() == "websocket")

            await eventually(upgraded, "the upgrade to WebSocket")
            assert (await client.act())["ok"] is True
        assert client.sio.transport() == transports[-1]


# -- across the processes ----------------------------------------------------------------------


async def test_an_emit_in_one_process_reaches_the_clients_of_the_other(
    deployment: Deployment,
) -> None:
    redis = Redis.from_url(deployment.redis.url)
    async with (
        connected(deployment.a.url, "broadcast") as on_a,
        connected(deployment.b.url, "broadcast") as on_b,
    ):
        # Each process subscribes once its first client has connected.
        async def both_subscribed() -> bool:
            ((_, subscribers),) = await redis.pubsub_numsub(CHANNEL)
            return int(subscribers) >= 2

        await eventually(both_subscribed, "both processes to subscribe")

        ack = await on_b.act("from-b")
        assert ack["ok"] is True
        assert (await on_a.next_event())["action"] == {"action": "from-b"}
        assert (await on_b.next_event())["action"] == {"action": "from-b"}

        await on_a.act("from-a")
        assert (await on_b.next_event())["action"] == {"action": "from-a"}
        assert (await on_a.next_event())["action"] == {"action": "from-a"}
    await redis.aclose()
    for process in (deployment.a, deployment.b):
        assert status(process)["emits"] == {"manager": "AsyncRedisManager", "channel": CHANNEL}


async def test_a_rate_limit_counts_the_events_of_both_processes(deployment: Deployment) -> None:
    async with (
        connected(deployment.a.url, "limited-shared") as on_a,
        connected(deployment.b.url, "limited-shared") as on_b,
    ):
        for client in (on_a, on_a, on_b, on_b):
            assert (await client.act())["ok"] is True
        # Each process has seen only half the limit; together they have used it all.
        for client in (on_a, on_b):
            refusal = await client.act()
            assert refusal["code"] == "RATE_LIMITED"
            assert refusal["policy"] == "rate_limits/actions-per-conversation"


async def test_an_answer_for_one_client_is_not_published_to_the_other_processes(
    deployment: Deployment,
) -> None:
    redis = Redis.from_url(deployment.redis.url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(CHANNEL)
    published: list[dict[str, Any]] = []

    async def next_published() -> dict[str, Any]:
        while True:
            message = await pubsub.get_message(timeout=WAIT)
            assert message is not None, f"nothing published after {published}"
            if message["type"] == "message":
                return dict(json.loads(message["data"]))

    def marker_seen() -> bool:
        return any(m["event"] == "oh_event" and m["room"] == "marker" for m in published)

    try:
        async with (
            connected(deployment.a.url, "limited-alone") as refused,
            connected(deployment.a.url, "marker") as marker,
        ):
            for _ in range(LIMIT):
                await refused.act()
            # Without an ack the refusal comes as a policy_error event, for this client only.
            await refused.sio.emit("oh_user_action", {"action": "one too many"})
            error = await asyncio.wait_for(refused.errors.get(), WAIT)
            assert error["code"] == "RATE_LIMITED"
            # A room's event is published: what was published before it arrives first.
            await marker.act("marker")
            while not marker_seen():
                published.append(await next_published())
    finally:
        await pubsub.aclose()
        await redis.aclose()

    events = [message["event"] for message in published]
    assert events == ["oh_event"] * (LIMIT + 1), published
