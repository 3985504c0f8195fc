"""The policy on python-socketio's sync server (``socketio.Server``, Flask-SocketIO's).

:func:`~policy_engine.adapter.attach.attach` gives a ``socketio.Server`` a
:class:`SyncPolicyAdapter`. It replaces the same instance methods the async adapter does,
in their sync form (which, and why each, is in ``docs/architecture.md``), and reaches the
one engine through :class:`~policy_engine.adapter.threads.EngineRunner`: inline under a
lock on the memory store, on a loop thread for a shared store. What a hook decides comes
from the engine and the adapter's pure helpers (the handshake's identity and ``conn``, the
refusal payloads, the screening of packets before decoding); only the calls to the
server differ, as plain calls instead of awaits.

Not applied on the sync server (``docs/architecture.md`` says why): the bounded outbound
buffer and priorities (Engine.IO's sync queue is a plain ``queue.Queue``), connection-state
recovery, and the protocol-error ceiling. Idle connections and ``action: disconnect``
shedding are handled by :meth:`SyncPolicyAdapter.tick`, which the load sampler calls
(:mod:`policy_engine.server.sync`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from policy_engine.adapter.authentication import ConnectAuthentication
from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.cors import CorsPolicy
from policy_engine.adapter.gate import HandshakeGate
from policy_engine.adapter.identity import ClaimsLoader
from policy_engine.adapter.sync_connections import SyncConnectionHooks
from policy_engine.adapter.sync_events import SyncEventDispatch
from policy_engine.adapter.threads import EngineRunner
from policy_engine.adapter.wsgi import WSGIApp, WSGIGate
from policy_engine.core.admission import AdmissionQueue
from policy_engine.core.engine import Engine
from policy_engine.core.payload import IDLE_TIMEOUT, backoff_for
from policy_engine.language.model import PolicySet, ShedAction
from policy_engine.observe.logs import ProtocolErrorLog
from policy_engine.observe.observer import NullObserver, Observer

_log = logging.getLogger("policy_engine.adapter.attach")

_monotonic = time.monotonic


class SyncPolicyAdapter(SyncConnectionHooks, SyncEventDispatch):
    """The policy installed on one ``socketio.Server``; created by :func:`attach`."""

    def __init__(
        self,
        sio: Any,
        engine: Engine,
        *,
        observer: Observer | None = None,
        error_event: str = "policy_error",
        claims_loader: ClaimsLoader | None = None,
    ) -> None:
        self.sio = sio
        self.engine = engine
        self.observer: Observer = observer or NullObserver()
        self.error_event = error_event
        self.claims_loader = claims_loader
        self.authentication = ConnectAuthentication(claims_loader)
        self.runner = EngineRunner(engine)
        self.admission = AdmissionQueue()
        self._admission_lock = threading.Lock()
        self.protocol_log = ProtocolErrorLog()
        self.draining = False
        self._states: dict[str, ConnectionState] = {}
        self._events_received = 0
        self._async_loader = claims_loader is not None and inspect.iscoroutinefunction(
            claims_loader
        )
        # The size of the message being handled, per thread (the one reading the client).
        self._inbound = threading.local()
        self._binary_sizes: dict[str, int] = {}
        self._emission = threading.local()
        self._configured_buffer: int = sio.eio.max_http_buffer_size
        self._limits = self._align(engine.policy)
        # The originals, called directly on the hot path.
        self._trigger: Callable[..., Any] = sio._trigger_event
        self._event_original: Callable[..., Any] = sio._handle_event_internal
        self._handle_event_original: Callable[..., Any] = sio._handle_event
        self._message_original: Callable[..., Any] = sio._handle_eio_message
        self._eio_disconnect_original: Callable[..., Any] = sio._handle_eio_disconnect
        self._emit_original: Callable[..., Any] = sio.emit
        self._send_eio_packet_original: Callable[..., Any] = sio._send_eio_packet
        self._not_handled = sio.not_handled
        self._installed_trigger = self._on_trigger

    # -- installation ------------------------------------------------------------------------

    def install(self) -> None:
        sio = self.sio
        sio._trigger_event = self._installed_trigger
        sio._handle_event_internal = self._on_event
        sio._handle_event = self._sized_event
        # Engine.IO calls its registered handler; Flask-SocketIO's test client the method.
        sio._handle_eio_message = self._on_message
        sio.eio.on("message", self._on_message)
        sio._handle_eio_disconnect = self._session_ended
        if sio.eio.handlers.get("disconnect") == self._eio_disconnect_original:
            sio.eio.handlers["disconnect"] = self._session_ended
        sio.emit = self._emit
        sio._send_eio_packet = self._send_eio_packet
        sio.policy_adapter = self

    # -- public API --------------------------------------------------------------------------

    def connections(self) -> Mapping[str, ConnectionState]:
        return MappingProxyType(self._states)

    def active_connections(self) -> int:
        return len(self._states)

    def events_received(self) -> int:
        """Events from connected clients since the start (the load's events per second)."""
        return self._events_received

    def swap(self, policy: PolicySet) -> None:
        """Install a new policy atomically for every thread: no decision runs half on the
        old policy and half on the new (its verifiers are built first, as on a reload)."""
        self.authentication.prepare(policy)
        self.runner.call(self.engine.swap, policy)

    def wsgi_app(self, app: WSGIApp) -> WSGIGate:
        """``app`` (``socketio.WSGIApp``, Flask-SocketIO's middleware, or Flask's
        ``app.wsgi_app``) behind the overload gate, which refuses new handshakes."""
        gate = HandshakeGate(
            _unused_asgi_app,
            self.engine,
            observer=self.observer,
            cors=CorsPolicy.of(self.sio.eio),
            admission=self.admission,
            draining=lambda: self.draining,
        )
        return WSGIGate(app, gate, lambda scope: self._queue_call(gate.judge, scope))

    async def shed_tick(self) -> int:
        """The load sampler's call after each sample (on the loop thread): :meth:`tick` in
        a worker thread, since what it calls may itself need the loop."""
        return await asyncio.to_thread(self.tick)

    def tick(self) -> int:
        """Close idle connections and disconnect what the policy's ``action: disconnect``
        rules pick; returns how many were shed. The load sampler calls it after every
        sample (:func:`policy_engine.server.sync.start`); without it, nothing is reaped."""
        engine = self.engine
        policy = engine.policy
        now = _monotonic()
        idle = policy.connections.idle_timeout
        if idle:
            payload = IDLE_TIMEOUT.payload("connections/idle_timeout", backoff=backoff_for(policy))
            for state in list(self._states.values()):
                if state.last_activity <= now - idle and not state.close_event:
                    self._close(state, payload, "idle_closed", "idle_timeout")
        if not self._states or not any(
            rule.action is ShedAction.DISCONNECT for rule in policy.shedding
        ):
            return 0
        candidates = []
        for state in list(self._states.values()):
            if not state.close_event:
                state.conn["connected_ms"] = int((now - state.connected_at) * 1000)
                candidates.append(state.conn)
        per_rule: Counter[str] = Counter()
        for sid, refusal_payload in self.runner.call(engine.connections_to_shed, candidates):
            chosen = self._states.get(sid)
            if chosen is None or chosen.close_event:
                continue
            rule = str(refusal_payload.get("policy", "shedding"))
            self._close(chosen, refusal_payload, "shed", rule)
            per_rule[rule] += 1
        for rule, count in per_rule.items():
            self.observer.shed(rule, "disconnect", count)
        return sum(per_rule.values())

    def _close(
        self, state: ConnectionState, payload: Mapping[str, Any], event: str, reason: str
    ) -> None:
        """Tell the client why, then disconnect it."""
        state.close_event, state.close_reason = event, reason
        try:
            self._notify(state.sid, state.namespace, payload)
            self.sio.disconnect(state.sid, namespace=state.namespace)
        except Exception:
            _log.exception("closing %s failed", state.sid)

    def close(self) -> None:
        """Release every tracked connection and stop the loop thread, if started."""
        for state in list(self._states.values()):
            self._untrack(state, "server shutdown", closed=True)
        self.runner.close()


async def _unused_asgi_app(*_: Any) -> None:
    """The gate's ASGI application, never called: the WSGI gate only asks it to judge."""
