"""Run a python-socketio application under a policy: the assembly behind ``policy-engine serve``.

:func:`build_app` wires the parts together (compiled policy, engine on its state store,
Socket.IO adapter, structlog and Prometheus observers, hot reloader, load sampler) and
returns a :class:`PolicyServer`, an ASGI application that answers the operations endpoints
itself and hands everything else to the Socket.IO app behind the policy:

* ``/healthz``: the process answers (liveness);
* ``/readyz``: a policy is loaded and the load sampler runs; 503 otherwise, including while
  shutting down, so a load balancer stops sending new clients first (readiness);
* ``/metrics``: Prometheus text;
* ``/status``: JSON: policy version, source, load time, reload counts, breaker states,
  active connections, the state store (and on a shared one, whether it answers) and the
  current load sample;
* ``/dashboard``: the live status page, drawn from ``/status`` (:mod:`.dashboard`).

The operations endpoints sit in front of the adapter's overload gate: a health check must
get an answer precisely when the server sheds Socket.IO traffic. Health and readiness are
answered on the public listener, for load balancers; ``/metrics`` and ``/status`` describe
the policy, its breakers and the load, which a client has no business reading, so they are
served on the separate operations listener (:attr:`PolicyServer.operations_app`, bound to
loopback by default), or on the public one only with the operator's bearer token.

:func:`serve` runs it all under uvicorn, with SIGHUP reloading the policy and SIGTERM or
SIGINT draining (:meth:`PolicyServer.drain`: readiness drops, every client is told and let
go at the policy's pace) before uvicorn stops and the lifespan stops the sampler and
adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import importlib.util
import json
import math
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal

import socketio
import structlog
import uvicorn
from prometheus_client import CollectorRegistry

from policy_engine.adapter.attach import ClaimsLoader, PolicyAdapter, attach
from policy_engine.auth.loader import HandshakeClaimsLoader
from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.classify import Classification
from policy_engine.core.engine import Engine
from policy_engine.core.tap import DecisionTap, Taps
from policy_engine.errors import PolicyEngineError
from policy_engine.language.model import PolicySet
from policy_engine.observe.composite import CompositeObserver
from policy_engine.observe.decision_log import DecisionLog
from policy_engine.observe.logs import (
    LogObserver,
    is_auth_error,
    log_store_availability,
)
from policy_engine.observe.metrics import MetricsObserver
from policy_engine.observe.observer import Observer
from policy_engine.server import dashboard, demo, relay
from policy_engine.server.canary import Canary
from policy_engine.server.reload import PolicyReloader
from policy_engine.server.sampler import EventCounter, LoadSampler
from policy_engine.server.watch import Watcher, watched_files
from policy_engine.state.memory import StateStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Route = Callable[[], Awaitable[tuple[int, bytes, bytes]]]

_log = structlog.get_logger("policy_engine")
_JSON = b"application/json"


class AppImportError(PolicyEngineError):
    """A ``MODULE:ATTR`` reference that does not name a usable ``socketio.AsyncServer``."""


class PolicyServer:
    """The ASGI application: operations endpoints, lifespan, then the Socket.IO app."""

    def __init__(
        self,
        *,
        sio: socketio.AsyncServer,
        engine: Engine,
        adapter: PolicyAdapter,
        reloader: PolicyReloader,
        sampler: LoadSampler,
        metrics: MetricsObserver,
        socketio_path: str = "socket.io",
        ops_token: str | None = None,
        public_operations: bool = False,
        decision_log: DecisionLog | None = None,
        canary: Canary | None = None,
        watch: bool = False,
    ) -> None:
        self.sio = sio
        self.engine = engine
        self.adapter = adapter
        self.reloader = reloader
        self.sampler = sampler
        self.metrics = metrics
        self.decision_log = decision_log
        self.canary = canary
        self.watcher = self._watcher() if watch else None
        self.socketio_app = adapter.asgi_app(socketio_path=socketio_path)
        self.started = False
        self.draining = False
        self._runner: uvicorn.Server | None = None
        self._routes: dict[str, Route] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/status": self._status,
            "/dashboard": dashboard.page,
        }
        self._ops_token = ops_token.encode() if ops_token else None
        self._public_operations = public_operations

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.adapter.start()
        self.sampler.start()
        if self.canary is not None:
            self.canary.start()
        if self.watcher is not None:
            self.watcher.start()
        self.started = True
        self.draining = self.adapter.draining = False

    async def stop(self) -> None:
        self.draining = True
        if self.watcher is not None:
            await self.watcher.stop()
        await self.sampler.stop()
        await self.adapter.stop()
        if self.canary is not None:
            await self.canary.stop()
        if self.decision_log is not None:
            self.decision_log.close()
        with contextlib.suppress(Exception):
            await self.engine.state.close()
        self.started = False

    def request_reload(self) -> None:
        """What SIGHUP and ``--watch`` do: reload the policy file, and the candidate's."""
        self.reloader.request_reload()
        if self.canary is not None:
            self.canary.reloader.request_reload()

    def _watcher(self) -> Watcher:
        """Watches the enforced policy's files and the candidate's."""
        reloader, canary = self.reloader, self.canary

        def files() -> list[Path]:
            paths = watched_files(reloader.path, self.engine.policy)
            if canary is not None:
                paths += watched_files(canary.reloader.path, canary.policy)
            return paths

        return Watcher(files, self.request_reload)

    async def drain(self) -> None:
        """Stop as the policy's ``drain`` says: readiness fails and new sessions are refused
        at once; after ``grace`` every client is told to reconnect and let go, at the
        policy's pace; then the server stops, all within ``deadline``."""
        self.draining = True
        self.adapter.draining = True
        spec = self.engine.policy.drain
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.deadline
        try:
            await asyncio.sleep(spec.grace)
            report = await self.adapter.drain(deadline)
            _log.info(
                "server.drained",
                sessions=report.sessions,
                paced=report.paced,
                at_deadline=report.at_deadline,
                audit=False,
            )
        finally:
            self.shutdown()

    def shutdown(self, *, force: bool = False) -> None:
        """Stop serving: readiness drops at once, then uvicorn drains and the lifespan stops.

        ``force`` skips waiting for open connections (a second Ctrl-C).
        """
        self.draining = True
        runner = self._runner
        if runner is not None:
            runner.force_exit = runner.force_exit or force
            runner.should_exit = True

    def not_ready_because(self) -> list[str]:
        """Why the server should get no new clients; empty when it is ready."""
        reasons = []
        if not self.started:
            reasons.append("not started")
        if self.draining:
            reasons.append("shutting down")
        if not self.sampler.running:
            reasons.append("load sampler not running")
        return reasons

    async def status(self) -> dict[str, Any]:
        return {
            **self.reloader.status(),
            "ready": not self.not_ready_because(),
            "breakers": await self.breaker_states(),
            "connections": {"active": self.adapter.active_connections()},
            "store": self.store_status(),
            "emits": relay.describe(self.sio),
            "load": dict(self.engine.load),
            "candidate": self.canary.status() if self.canary is not None else None,
        }

    def store_status(self) -> dict[str, Any]:
        return self.engine.state.status()

    async def breaker_states(self) -> dict[str, str]:
        """Each breaker's circuit; on a shared store as stored there, "unknown" if it does not
        answer within ``store_timeout``."""
        state = self.engine.state
        names = [spec.name for spec in self.engine.policy.circuit_breakers]
        circuits = await asyncio.gather(*(state.circuit(name) for name in names))
        return dict(zip(names, circuits, strict=True))

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "http":
            path = scope["path"]
            route = self._routes.get(path)
            if route is not None and (path in _PUBLIC_ROUTES or self._may_operate(scope)):
                await self._answer(scope, send, route)
                return
        await self.socketio_app(scope, receive, send)

    async def operations_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every operations endpoint and nothing else, for a listener only operators reach."""
        if scope["type"] == "lifespan":
            await _refuse_lifespan(receive, send)
            return
        route = self._routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await _send(send, 404, b"text/plain", b"not found\n", [], scope.get("method"))
            return
        await self._answer(scope, send, route)

    def _may_operate(self, scope: Scope) -> bool:
        """Whether the public listener may answer ``/metrics`` and ``/status`` to this request."""
        if self._ops_token is not None:
            for name, value in scope.get("headers") or ():
                if name.lower() == b"authorization":
                    scheme, _, credentials = value.partition(b" ")
                    return scheme.lower() == b"bearer" and hmac.compare_digest(
                        credentials.strip(), self._ops_token
                    )
            return False
        return self._public_operations

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    _log.exception("server.start_failed", audit=False)
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.stop()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _answer(self, scope: Scope, send: Send, route: Route) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            status, content_type, body = 405, b"text/plain", b"method not allowed\n"
            headers = [(b"allow", b"GET, HEAD")]
        else:
            status, content_type, body = await route()
            headers = []
        await _send(send, status, content_type, body, headers, method)

    async def _healthz(self) -> tuple[int, bytes, bytes]:
        return 200, b"text/plain", b"ok\n"

    async def _readyz(self) -> tuple[int, bytes, bytes]:
        reasons = self.not_ready_because()
        body = json.dumps({"ready": not reasons, "reasons": reasons}).encode()
        return (503 if reasons else 200), _JSON, body

    async def _metrics(self) -> tuple[int, bytes, bytes]:
        body, content_type = self.metrics.render()
        return 200, content_type.encode(), body

    async def _status(self) -> tuple[int, bytes, bytes]:
        return 200, _JSON, json.dumps(await self.status()).encode()


_PUBLIC_ROUTES = frozenset({"/healthz", "/readyz"})


async def _send(  # noqa: PLR0917 (one response, every part of it)
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    method: str | None,
) -> None:
    headers = [
        *headers,
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def _refuse_lifespan(receive: Receive, send: Send) -> None:
    """The operations listener has no lifespan of its own: the public one runs the server's."""
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": "no lifespan here"})


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "redis+sentinel://")


def open_store(url: str | None) -> StateStore | None:
    """The shared state store a URL names: ``redis://``, ``rediss://`` or ``unix://`` for
    one Redis, ``redis+cluster://host:port[,host:port...]`` for a Redis Cluster,
    ``redis+sentinel://host:port[,host:port...]/service[/db]`` for the master Sentinels
    name; None (each process keeps its own state) for no URL or ``memory``. Raises
    ValueError for a URL it cannot use."""
    if not url or url == "memory":
        return None
    if url.startswith(_REDIS_SCHEMES):
        try:
            from policy_engine.state.redis_store import RedisStore  # noqa: PLC0415 (the redis extra)
        except ImportError as exc:
            raise ValueError(
                f"the Redis store needs the redis package: pip install 'policy-engine[redis]' "
                f"({exc})"
            ) from exc
        return RedisStore(url)
    raise ValueError(
        f"unknown state store {url!r}: use memory, or a URL starting {', '.join(_REDIS_SCHEMES)}"
    )


def build_app(
    sio: socketio.AsyncServer,
    policies: str | Path,
    *,
    observers: Sequence[Observer] = (),
    registry: CollectorRegistry | None = None,
    sample_interval: float = 0.5,
    lag_threshold_ms: int = 100,
    socketio_path: str = "socket.io",
    cel_backend: str | None = None,
    claims_loader: ClaimsLoader | HandshakeClaimsLoader | None = None,
    store: StateStore | None = None,
    ops_token: str | None = None,
    public_operations: bool = False,
    candidate: str | Path | None = None,
    watch: bool = False,
) -> PolicyServer:
    """Compile ``policies`` and put ``sio`` behind it; raises PolicyError on an invalid file.

    ``store`` is the shared state store (see :func:`open_store`); without one, state lives
    in this process's memory. ``/metrics`` and ``/status`` are served by
    :meth:`PolicyServer.operations_app`; the public app answers them only to a request with
    ``Authorization: Bearer <ops_token>``, or to anyone with ``public_operations``.

    ``candidate`` is a second policy file judged in shadow on live traffic
    (:mod:`policy_engine.server.canary`); ``watch`` reloads both files when they change
    (:mod:`policy_engine.server.watch`). The policy's ``decision_log`` section, when it
    has one, writes its decisions (:mod:`policy_engine.observe.decision_log`).
    """
    result = compile_file(policies, backend=cel_backend)
    source = str(policies)
    engine = Engine(result.policy, store)  # the wall clock when shared
    metrics = MetricsObserver(registry, process_metrics=True)

    def is_audit_error(classification: Classification) -> bool:
        return engine.counts_as_auth_failure(classification) or is_auth_error(classification)

    connects = EventCounter()  # the adapter counts events; this counts judged connects
    observer = CompositeObserver(
        metrics, LogObserver(is_audit_error=is_audit_error), connects, *observers
    )
    if engine.state.shared:
        engine.store_health.listeners.append(log_store_availability)
        metrics.track_store(engine.store_health)
    adapter = attach(sio, engine, observer=observer, claims_loader=claims_loader)
    if not isinstance(adapter, PolicyAdapter):
        raise TypeError("build_app serves a socketio.AsyncServer; run a socketio.Server yourself")
    metrics.install_policy(result.policy, source)
    metrics.track_connections(adapter.active_connections)
    decision_log = DecisionLog(result.policy)
    canary = (
        Canary(candidate, metrics=metrics, backend=cel_backend, clock=engine.clock)
        if candidate
        else None
    )

    def tap(policy: PolicySet) -> None:
        """The engine's taps for ``policy``: its decision log when it has one, the canary."""
        decision_log.configure(policy)
        taps: list[DecisionTap] = [decision_log] if decision_log.active else []
        if canary is not None:
            taps.append(canary)
        engine.tap = taps[0] if len(taps) == 1 else (Taps(taps) if taps else None)

    tap(result.policy)
    reloader = PolicyReloader(
        policies,
        engine,
        observer,
        backend=cel_backend,
        on_install=[lambda policy: metrics.install_policy(policy, source), tap],
        before_install=[adapter.authentication.prepare],
    )
    sampler = LoadSampler(
        engine,
        adapter,
        sample_interval,
        connects=connects,
        lag_threshold_ms=lag_threshold_ms,
        on_sample=[metrics.observe_load, decision_log.flush],
    )
    _log.info(
        "policy.loaded",
        outcome="success",
        version=result.policy.version,
        path=source,
        warnings=[str(d) for d in result.warnings],
        audit=False,
    )
    return PolicyServer(
        sio=sio,
        engine=engine,
        adapter=adapter,
        reloader=reloader,
        sampler=sampler,
        metrics=metrics,
        socketio_path=socketio_path,
        ops_token=ops_token,
        public_operations=public_operations,
        decision_log=decision_log,
        canary=canary,
        watch=watch,
    )


def load_server(reference: str | None, *, client_manager: Any = None) -> socketio.AsyncServer:
    """The ``socketio.AsyncServer`` named by ``MODULE:ATTR`` (``ATTR`` may be dotted).

    ``None`` means the built-in demo conversation app, a fresh instance each time, with
    ``client_manager`` when one is given (see :func:`relay.redis_manager`). A server named
    by reference keeps the manager it was created with.
    """
    if reference is None:
        if client_manager is None:
            return demo.create_server()
        return demo.create_server(client_manager=client_manager)
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise AppImportError(f"{reference!r}: expected MODULE:ATTR, e.g. myapp.server:sio")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppImportError(f"{reference!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppImportError(
                f"{reference!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(target, socketio.AsyncServer):
        raise AppImportError(
            f"{reference!r} is a {type(target).__name__}, not a socketio.AsyncServer"
        )
    if target.async_mode != "asgi":
        raise AppImportError(
            f"{reference!r} runs in async_mode {target.async_mode!r}; "
            "create it with socketio.AsyncServer(async_mode='asgi')"
        )
    return target


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` installs handlers on the loop.

    uvicorn re-raises a captured SIGTERM after shutting down, which would end the process
    with the signal's status instead of returning from a clean shutdown.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    server: PolicyServer,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    graceful_timeout: float = 10.0,
    install_signals: bool = True,
    ops_host: str = "127.0.0.1",
    ops_port: int | None = None,
    listening: socket.socket | None = None,
) -> None:
    """Serve until :meth:`PolicyServer.shutdown`, SIGTERM or SIGINT; SIGHUP reloads.

    A second SIGINT forces the exit. ``install_signals=False`` leaves the process's signal
    handling alone, for a server embedded in a larger program or a test. With ``ops_port``
    the operations endpoints get a listener of their own on ``ops_host``. ``listening``: a
    socket already listening on ``host``:``port`` (see :mod:`policy_engine.server.listen`),
    served instead of binding one.

    uvicorn's own proxy-header handling is off: it would rewrite the peer address from
    ``X-Forwarded-For`` for any peer in ``FORWARDED_ALLOW_IPS`` before the policy's
    ``identity.trusted_proxies`` is consulted, so a second, looser trust decision would
    decide who the client is.
    """
    runner = _Server(_config(server, host, port, graceful_timeout, lifespan="on"))
    listeners = [runner]
    if ops_port is not None:
        ops_config = _config(server.operations_app, ops_host, ops_port, 1, lifespan="off")
        listeners.append(_Server(ops_config))
    server._runner = runner
    loop = asyncio.get_running_loop()
    exit_signals = (signal.SIGTERM, signal.SIGINT)

    draining: list[asyncio.Task[None]] = []

    def request_exit(signum: int) -> None:
        """The first signal drains (see :meth:`PolicyServer.drain`); a second one stops at
        once, and a second SIGINT does not wait for open connections either."""
        _log.info("server.stopping", signal=signal.Signals(signum).name, audit=False)
        if not draining:
            draining.append(loop.create_task(server.drain()))
            return
        server.shutdown(force=signum == signal.SIGINT)

    if install_signals:
        loop.add_signal_handler(signal.SIGHUP, server.request_reload)
        for signum in exit_signals:
            loop.add_signal_handler(signum, request_exit, signum)
    others = [asyncio.create_task(listener.serve()) for listener in listeners[1:]]
    if listening is not None:  # uvicorn says where it runs only for sockets of its own
        bound_host, bound_port = listening.getsockname()[:2]
        _log.info("server.listening", url=f"http://{bound_host}:{bound_port}", audit=False)
    try:
        await runner.serve(sockets=[listening] if listening is not None else None)
    finally:
        for task in draining:
            task.cancel()
        server._runner = None
        for listener in listeners[1:]:
            listener.should_exit = True
        await asyncio.gather(*others, return_exceptions=True)
        if install_signals:
            loop.remove_signal_handler(signal.SIGHUP)
            for signum in exit_signals:
                loop.remove_signal_handler(signum)


def _config(
    app: Any, host: str, port: int, graceful_timeout: float, *, lifespan: Literal["on", "off"]
) -> uvicorn.Config:
    ws = "wsproto" if importlib.util.find_spec("wsproto") is not None else "auto"
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ws=ws,
        lifespan=lifespan,
        interface="asgi3",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=math.ceil(graceful_timeout),
    )
