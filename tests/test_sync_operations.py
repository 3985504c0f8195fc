"""Hot reload and the load sampler for the sync server, against a live Flask-SocketIO app."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from flask_socketio import SocketIO
from servers import WAIT
from sync_servers import SyncServed, start_sync_server

from policy_engine.adapter.threads import EngineRunner, SuspendedError, run_inline
from policy_engine.compiler.pipeline import compile_file
from policy_engine.server import sync

LIMIT = """
version: 1
rate_limits:
  - name: echo-per-connection
    hook: event
    when: event.name == "echo"
    key: conn.sid
    limit: 1/minute
    burst: BURST
connections:
  idle_timeout: IDLE
"""


def policy(burst: int = 100, idle: str = "5m") -> str:
    return LIMIT.replace("BURST", str(burst)).replace("IDLE", idle)


def echo_app(ext: SocketIO) -> None:
    @ext.on("echo")
    def echo(data: Any) -> Any:
        return data


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[SyncServed, Path]]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy(), encoding="utf-8")
    running = start_sync_server(path, flask_setup=echo_app)
    yield running, path
    running.stop()


@pytest.fixture
def client() -> Iterator[socketio.Client]:
    connected = socketio.Client(reconnection=False)
    yield connected
    if connected.eio.ws is not None:
        connected.eio.ws.shutdown()
    connected.eio.disconnect(abort=True)


def wait_for(condition: Any) -> None:
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("the condition never held")


def test_sighup_reloads_the_file_and_the_next_event_is_judged_by_it(served, client):
    running, path = served
    client.connect(running.url, transports=["websocket"], wait_timeout=WAIT)
    previous = signal.getsignal(signal.SIGHUP)
    services = sync.start(running.adapter, path, sample_every=0.05)
    try:
        assert client.call("echo", 1, timeout=WAIT) == 1
        path.write_text(policy(burst=1), encoding="utf-8")
        version = running.engine.policy.version

        os.kill(os.getpid(), signal.SIGHUP)

        wait_for(lambda: running.engine.policy.version != version)
        assert services.reloader.succeeded == 1
        answer = client.call("echo", 2, timeout=WAIT)
        assert answer["code"] == "RATE_LIMITED"  # the rule kept its name, so its count
    finally:
        signal.signal(signal.SIGHUP, previous)
        running.adapter.runner.on_loop(services.sampler.stop())


def test_a_broken_file_keeps_the_policy_in_force(served):
    running, path = served
    services = sync.start(running.adapter, path, sighup=False)
    version = running.engine.policy.version
    path.write_text("version: 1\nrate_limits: [{name: x}]\n", encoding="utf-8")

    assert services.reload() is False

    assert running.engine.policy.version == version
    assert services.reloader.failed == 1
    running.adapter.runner.on_loop(services.sampler.stop())


class WatchedLock:
    """The runner's lock, telling when someone asks for it."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.asked = threading.Event()

    def __enter__(self) -> None:
        self.asked.set()
        self.lock.acquire()

    def __exit__(self, *_: object) -> None:
        self.lock.release()


def test_a_swap_waits_for_the_decision_in_progress(served, tmp_path):
    running, _ = served
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(policy(burst=1), encoding="utf-8")
    new = compile_file(stricter).policy
    old = running.engine.policy
    held = threading.Lock()
    watched = running.adapter.runner.lock = WatchedLock(held)

    with held:  # a decision in progress holds it
        swapping = threading.Thread(target=running.adapter.swap, args=(new,))
        swapping.start()
        assert watched.asked.wait(WAIT)
        assert running.engine.policy is old
    swapping.join(WAIT)

    assert running.engine.policy is new


def test_the_sampler_publishes_the_load_and_the_tick_closes_idle_connections(tmp_path, client):
    path = tmp_path / "policy.yaml"
    path.write_text(policy(idle="1s"), encoding="utf-8")
    running = start_sync_server(path, flask_setup=echo_app)
    notices: list[Any] = []
    client.on("policy_error", notices.append)
    services = sync.start(running.adapter, path, sighup=False, sample_every=0.05)
    try:
        client.connect(running.url, transports=["websocket"], wait_timeout=WAIT)
        wait_for(lambda: running.engine.load["active_connections"] == 1)

        wait_for(lambda: bool(notices))

        assert notices[0]["code"] == "IDLE_TIMEOUT"
        wait_for(lambda: running.adapter.active_connections() == 0)
        assert [event for event, _, _ in running.observer.connections] == [
            "opened",
            "idle_closed",
        ]
        assert services.sampler.samples > 0
    finally:
        services.stop()
        running.live.stop()


def test_an_engine_coroutine_is_run_inline_to_its_result():
    async def answer() -> int:
        return 42

    assert run_inline(answer()) == 42


class _Waits:
    """What an awaited future hands the driver: something to wait for."""

    def __await__(self) -> Any:
        yield "a future"


def test_a_coroutine_that_waits_is_refused_inline_and_closed():
    finished: list[bool] = []

    async def waits() -> None:
        try:
            await _Waits()
        finally:
            finished.append(True)

    with pytest.raises(SuspendedError):
        run_inline(waits())
    assert finished == [True]  # closed, not left suspended


def test_the_loop_thread_refuses_to_wait_for_itself(served):
    running, _ = served
    runner: EngineRunner = running.adapter.runner

    async def nested() -> None:
        async def inner() -> None:
            return None

        runner.on_loop(inner())

    with pytest.raises(RuntimeError, match="cannot wait for itself"):
        runner.on_loop(nested())


SHARED_LIMIT = """
version: 1
rate_limits:
  - name: echoes-everywhere
    hook: event
    when: event.name == "echo"
    key: '"all"'
    limit: 1/minute
    burst: 3
    scope: global
"""


def test_two_sync_servers_on_one_redis_share_a_limit_through_the_loop_thread(
    tmp_path, own_redis_server
):
    from policy_engine.state.redis_store import RedisStore

    path = tmp_path / "policy.yaml"
    path.write_text(SHARED_LIMIT, encoding="utf-8")
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    servers = [
        start_sync_server(
            path, flask_setup=echo_app, store=RedisStore(own_redis_server.url, prefix=prefix)
        )
        for _ in range(2)
    ]
    clients = [socketio.Client(reconnection=False) for _ in servers]
    try:
        for client, running in zip(clients, servers, strict=True):
            client.connect(running.url, transports=["websocket"], wait_timeout=WAIT)
        assert not servers[0].adapter.runner.inline

        first = [clients[0].call("echo", n, timeout=WAIT) for n in range(2)]
        second = [clients[1].call("echo", n, timeout=WAIT) for n in range(2)]

        assert first == [0, 1]
        assert second[0] == 0
        assert second[1]["code"] == "RATE_LIMITED"  # the fourth echo of both servers
    finally:
        for client in clients:
            if client.eio.ws is not None:
                client.eio.ws.shutdown()
            client.eio.disconnect(abort=True)
        for running in servers:
            running.adapter.runner.on_loop(running.engine.store.close())
            running.stop()


SHEDDING = """
version: 1
shedding:
  - name: shed-viewers
    when: load.loop_lag_ms > 100
    action: disconnect
    max_priority: low
"""


def test_the_tick_disconnects_what_shedding_picks_with_the_payload_first(tmp_path, client):
    path = tmp_path / "policy.yaml"
    path.write_text(SHEDDING, encoding="utf-8")
    running = start_sync_server(path, flask_setup=echo_app)
    notices: list[Any] = []
    client.on("policy_error", notices.append)
    try:
        client.connect(running.url, transports=["websocket"], wait_timeout=WAIT)
        sid = client.get_sid()
        running.engine.load = {**running.engine.load, "loop_lag_ms": 500}

        shed = running.adapter.tick()

        assert shed == 1
        wait_for(lambda: bool(notices))
        assert notices[0]["policy"] == "shedding/shed-viewers"
        assert running.observer.sheds == [("shedding/shed-viewers", "disconnect", 1)]
        wait_for(lambda: running.adapter.active_connections() == 0)
        assert ("shed", sid, "shedding/shed-viewers") in running.observer.connections
    finally:
        running.stop()
