"""Real servers and clients for the adapter's tests: uvicorn on loopback, python-socketio.

A :class:`LiveServer` runs uvicorn in a thread with its own event loop, on a free loopback
port, exactly as in production (ASGI, wsproto WebSockets, lifespan); the tests drive it
with real ``socketio.AsyncClient`` instances from pytest's loop. Code that must run inside
the server (an ``emit``, a look at the adapter's state) goes through :meth:`LiveServer.run`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import socketio
import uvicorn

from policy_engine.adapter.admission import ADVICE_EVENT, ADVICE_NAMESPACE
from policy_engine.adapter.attach import PolicyAdapter, attach
from policy_engine.adapter.identity import ClaimsLoader
from policy_engine.algorithms.breaker import Transition
from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision
from policy_engine.core.engine import Engine
from policy_engine.errors import Diagnostic
from policy_engine.state.memory import StateStore

T = TypeVar("T")

SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"
WAIT = 10.0  # generous ceiling for conditions that normally hold within milliseconds
CONTRACT_KEYS = {
    "code",
    "category",
    "message",
    "retryable",
    "retry_after_ms",
    "backoff",
    "policy",
    "correlation_id",
}


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="on",
            ws="wsproto",
            http="h11",
            log_level="warning",
            # uvicorn's loggers propagate to the root logger, so a test that checks the log
            # (caplog, the fuzz suite's capture) also sees an exception that escaped the app.
            log_config=None,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="live-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(WAIT)
        self._sock.close()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` in the server's loop and wait for its result from the caller's."""
        assert self.loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            loop.run_until_complete(self.server.serve(sockets=[self._sock]))
        finally:
            # Engine.IO's service and ping tasks outlive uvicorn: end them like a process would.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()


class RecordingObserver:
    """An observer that keeps every report, for assertions."""

    def __init__(self) -> None:
        self.decisions: list[tuple[str, Decision, Mapping[str, Any] | None]] = []
        self.errors: list[tuple[str, Classification, Mapping[str, Any], Mapping[str, Any]]] = []
        self.transitions: list[tuple[str, Transition]] = []
        self.sheds: list[tuple[str, str, int]] = []
        self.connections: list[tuple[str, str, str]] = []
        self.drops: list[tuple[str, str, str]] = []

    def decision(
        self, hook: str, decision: Decision, seconds: float, conn: Mapping[str, Any] | None
    ) -> None:
        self.decisions.append((hook, decision, conn))

    def error(
        self,
        hook: str,
        classification: Classification,
        error: Mapping[str, Any],
        payload: Mapping[str, Any],
        conn: Mapping[str, Any] | None,
    ) -> None:
        self.errors.append((hook, classification, error, payload))

    def breaker_transition(self, name: str, transition: Transition) -> None:
        self.transitions.append((name, transition))

    def shed(self, rule: str, action: str, count: int) -> None:
        self.sheds.append((rule, action, count))

    def reload(
        self, ok: bool, version: str | None, path: str, diagnostics: Sequence[Diagnostic]
    ) -> None:
        return None

    def connection(self, event: str, conn: Mapping[str, Any], reason: str = "") -> None:
        self.connections.append((event, conn["sid"], reason))

    def outbound_drop(self, conn: Mapping[str, Any], event: str, reason: str) -> None:
        self.drops.append((conn["sid"], event, reason))


@dataclass
class Served:
    """One application under a policy, served for real."""

    sio: socketio.AsyncServer
    engine: Engine
    adapter: PolicyAdapter
    observer: RecordingObserver
    live: LiveServer

    @property
    def url(self) -> str:
        return self.live.url

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return await self.live.run(coroutine)

    async def emit(self, event: str, data: Any = None, **kwargs: Any) -> None:
        await self.run(self.sio.emit(event, data, **kwargs))


def policy_path(tmp_path: Path, text: str | None) -> Path:
    """The shipped policy, or ``text`` written to a file of its own."""
    if text is None:
        return SHIPPED_POLICY
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def start_server(
    policy: Path,
    *,
    setup: Callable[[socketio.AsyncServer], None] | None = None,
    setup_after: Callable[[socketio.AsyncServer], None] | None = None,
    claims_loader: ClaimsLoader | None = None,
    store: StateStore | None = None,
    **sio_options: Any,
) -> Served:
    """``setup`` registers handlers before ``attach``; ``setup_after`` after it.

    ``store``: a shared state store (the engine's memory store otherwise).
    """
    sio = socketio.AsyncServer(async_mode="asgi", **sio_options)
    if setup is not None:
        setup(sio)
    engine = Engine(compile_file(policy).policy, store)
    observer = RecordingObserver()
    adapter = attach(sio, engine, observer=observer, claims_loader=claims_loader)
    if setup_after is not None:
        setup_after(sio)
    live = LiveServer(adapter.asgi_app())
    live.start()
    return Served(sio, engine, adapter, observer, live)


@dataclass
class Inbox:
    """What one client received, in order, with a way to wait for more."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    disconnects: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, event: str, data: Any) -> None:
        self.events.append((event, data))
        self._changed.set()

    def of(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    def notify(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class Clients:
    """Real ``socketio.AsyncClient`` instances, all disconnected at the end of a test."""

    def __init__(self) -> None:
        self.opened: list[socketio.AsyncClient] = []

    async def connect(
        self,
        url: str,
        *,
        query: Mapping[str, Any] | None = None,
        auth: Any = None,
        headers: Mapping[str, str] | None = None,
        namespaces: Sequence[str] | None = None,
        transports: Sequence[str] = ("websocket",),
        listen: Sequence[str] = ("oh_event", "policy_error", "news", "flood"),
    ) -> tuple[socketio.AsyncClient, Inbox]:
        """Connect; returns the client and the inbox of the ``listen`` events."""
        client, inbox = self.new(listen, namespaces)
        target = f"{url}?{urlencode(query)}" if query else url
        await client.connect(
            target,
            auth=auth,
            headers=dict(headers or {}),
            namespaces=list(namespaces) if namespaces else None,
            transports=list(transports),
            wait_timeout=WAIT,
        )
        return client, inbox

    def new(
        self, listen: Sequence[str] = (), namespaces: Sequence[str] | None = None
    ) -> tuple[socketio.AsyncClient, Inbox]:
        client = socketio.AsyncClient(reconnection=False)
        inbox = Inbox()
        for namespace in namespaces or ["/"]:
            for event in listen:
                client.on(event, _recorder(inbox, event), namespace=namespace)

            @client.on("connect_error", namespace=namespace)
            async def connect_error(data: Any) -> None:
                inbox.errors.append(data)
                inbox.notify()

            @client.on("disconnect", namespace=namespace)
            async def disconnected(*_: Any) -> None:
                inbox.disconnects += 1
                inbox.notify()

        original = client._trigger_event

        async def trigger(event: str, namespace: str | None = None, *args: Any) -> Any:
            if event == ADVICE_EVENT and namespace == ADVICE_NAMESPACE and args:
                # A refusal retrying can fix ends the session after this advice instead of
                # sending connect_error: recorded as connect_error would have carried it.
                inbox.errors.append({"message": args[0].get("message"), "data": args[0]})
                inbox.notify()
            return await original(event, namespace, *args)

        client._trigger_event = trigger  # as sio.instrument() does: no namespace to join

        self.opened.append(client)
        return client, inbox

    async def refused(
        self,
        url: str,
        *,
        query: Mapping[str, Any] | None = None,
        namespaces: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Attempt a connection that must fail; returns the ``connect_error`` data (or the
        advice of a refusal that closed the session, which python-socketio's client only
        notices when its ``wait_timeout`` runs out: the attempt ends at the advice)."""
        client, inbox = self.new(namespaces=namespaces)
        target = f"{url}?{urlencode(query)}" if query else url
        attempt = asyncio.ensure_future(
            client.connect(
                target,
                transports=["websocket"],
                wait_timeout=WAIT,
                namespaces=list(namespaces) if namespaces else None,
                **kwargs,
            )
        )
        await inbox.until(lambda: bool(inbox.errors) or attempt.done())
        if not attempt.done():
            attempt.cancel()
        try:
            await attempt
        except (socketio.exceptions.ConnectionError, asyncio.CancelledError):
            pass
        else:
            raise AssertionError("the connection was accepted")
        await inbox.until(lambda: bool(inbox.errors))
        return inbox.errors[-1]

    async def close(self) -> None:
        for client in self.opened:
            if client.connected:
                await client.disconnect()
            elif client.eio.queue is not None:
                # A refused client whose connect was cancelled may leave Engine.IO's write
                # loop waiting for its queue (up to the ping timeout, 30 s), and disconnect
                # waits for that loop: end it at once.
                client.eio.queue.put_nowait(None)
            await client.eio.disconnect()
            if client.eio.http is not None and not client.eio.http.closed:
                await client.eio.http.close()


def _recorder(inbox: Inbox, event: str) -> Callable[..., Awaitable[None]]:
    async def record(*args: Any) -> None:
        inbox.add(event, args[0] if len(args) == 1 else list(args))

    return record


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds (it reads state another thread changes)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# -- small policies and apps shared by the client tests (Python and JavaScript) --------------

_CONNECT_LIMIT = """
version: 1
defaults: {backoff: brief}
backoff:
  brief: {strategy: constant, base: 10ms, max: 10ms, max_attempts: 2}
rate_limits:
  - name: connect-per-ip
    hook: connect
    key: conn.ip
    limit: RATE
    burst: 1
"""

EVENT_LIMIT = """
version: 1
defaults: {backoff: brief}
backoff:
  brief: {strategy: constant, base: 10ms, max: 10ms, max_attempts: 3}
rate_limits:
  - name: echo-per-connection
    hook: event
    when: event.name == "echo"
    key: conn.sid
    limit: 2/s
    burst: 1
"""


def connect_limit(rate: str) -> str:
    """A policy that admits one connect per IP at once, then ``rate``."""
    return _CONNECT_LIMIT.replace("RATE", rate)


def echo_app(sio: socketio.AsyncServer) -> None:
    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data
