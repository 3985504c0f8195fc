"""The Socket.IO adapter: applies the engine's decisions at python-socketio's hook points.

:func:`attach` installs the policy on an existing ``socketio.AsyncServer`` by replacing a few
methods on the server instance, as ``sio.instrument()`` does, so no application handler
changes. Which methods, and why each, is in ``docs/architecture.md``. :class:`PolicyAdapter`
is the installed policy and its public face; its hooks live by responsibility in
:mod:`~policy_engine.adapter.connections` (connect and disconnect),
:mod:`~policy_engine.adapter.events` (incoming events),
:mod:`~policy_engine.adapter.inbound` (every packet received, before it is decoded) and
:mod:`~policy_engine.adapter.outgoing` (``emit`` and every packet sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import socketio

from policy_engine.adapter.asgi import ASGIApp, Lifespan, OversizedFrames
from policy_engine.adapter.authentication import ConnectAuthentication, environ_loader
from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.connections import ConnectionHooks
from policy_engine.adapter.cors import CorsPolicy
from policy_engine.adapter.drain import (
    DrainReport,
    by_session,
    drain_notice,
    drain_sessions,
)
from policy_engine.adapter.events import EventDispatch
from policy_engine.adapter.gate import HandshakeGate
from policy_engine.adapter.identity import ClaimsLoader
from policy_engine.adapter.inbound import Inbound
from policy_engine.adapter.outgoing import Buffered, Outgoing
from policy_engine.adapter.recovery import Recovery
from policy_engine.adapter.sync_server import SyncPolicyAdapter
from policy_engine.auth.loader import HandshakeClaimsLoader
from policy_engine.core.admission import AdmissionQueue
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import Engine
from policy_engine.core.payload import IDLE_TIMEOUT, ClientPayload, backoff_for
from policy_engine.language.model import ShedAction
from policy_engine.observe.observer import NullObserver, Observer

__all__ = ["ClaimsLoader", "ConnectionState", "PolicyAdapter", "SyncPolicyAdapter", "attach"]

# The adapter's one logger, whichever of its modules reports.
_log = logging.getLogger("policy_engine.adapter.attach")

_MIN_TICK = 0.05
# How long a connection closed for protocol errors has to read why before its socket closes.
CLOSE_DRAIN = 2.0
_MAX_TICK = 1.0


class PolicyAdapter(ConnectionHooks, EventDispatch):
    """The policy installed on one ``socketio.AsyncServer``; created by :func:`attach`."""

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
        self._states: dict[str, ConnectionState] = {}
        self.admission = AdmissionQueue()
        self._events_received = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.draining = False  # letting its clients go: new sessions are refused
        self.outgoing = Outgoing(
            sio, engine, self.observer, buffer=self._buffer_for_replay, spawn=self._spawn
        )
        self.recovery = Recovery(
            engine,
            self.observer,
            conversation_of=self._conversation_of,
            replay=self.outgoing.replay,
            notify=self._notify,
        )
        self.inbound = Inbound(
            sio, engine, answer=self._refuse_packet, close=self._close_connection
        )
        # The originals, called directly on the hot path.
        self._trigger: Callable[..., Awaitable[Any]] = sio._trigger_event
        self._event_original: Callable[..., Awaitable[Any]] = sio._handle_event_internal
        self._not_handled = sio.not_handled
        self._installed_trigger = self._on_trigger

    # -- installation ------------------------------------------------------------------------

    def install(self) -> None:
        sio = self.sio
        sio._trigger_event = self._installed_trigger
        sio._handle_event_internal = self._on_event
        self.outgoing.install()
        self._watch_sessions()
        self.inbound.install()
        sio.policy_adapter = self

    # -- public API --------------------------------------------------------------------------

    def connections(self) -> Mapping[str, ConnectionState]:
        return MappingProxyType(self._states)

    def active_connections(self) -> int:
        return len(self._states)

    def events_received(self) -> int:
        """Events from connected clients since the start (the load's events per second)."""
        return self._events_received

    def asgi_app(self, other_asgi_app: Any = None, *, socketio_path: str = "socket.io") -> ASGIApp:
        """``socketio.ASGIApp`` behind the overload gate; its lifespan starts this adapter."""
        inner = socketio.ASGIApp(self.sio, other_asgi_app, socketio_path=socketio_path)
        eio = self.sio.eio
        checked = OversizedFrames(
            inner, lambda: eio.max_http_buffer_size, self.inbound.marker, socketio_path
        )
        gate = HandshakeGate(
            checked,
            self.engine,
            socketio_path=socketio_path,
            observer=self.observer,
            cors=CorsPolicy.of(self.sio.eio),
            admission=self.admission,
            draining=lambda: self.draining,
        )
        return Lifespan(gate, self.start, self.stop)

    async def start(self) -> None:
        """Start the idle reaper (idempotent); outbound pumps start on demand."""
        await self.authentication.prefetch(self.engine.policy)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def stop(self) -> None:
        reaper, self._reaper = self._reaper, None
        tasks = [*self._tasks, *([reaper] if reaper is not None else [])]
        for task in tasks:
            task.cancel()
        self.outgoing.close()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.release_all()

    async def drain(self, deadline: float) -> DrainReport:
        """Let every client go by ``deadline`` (on the loop's clock), as the policy's
        ``drain`` says: see :mod:`policy_engine.adapter.drain`. New sessions are refused
        from now on (the handshake gate answers ``SERVER_DRAINING``)."""
        self.draining = True
        policy = self.engine.policy
        spec = policy.drain
        rng = random.Random()

        sessions = by_session(self._states.values())

        async def tell(eio_sid: str) -> None:
            for state in sessions[eio_sid]:
                if not state.close_event:
                    state.close_event, state.close_reason = "drained", "drain"
                    await self._notify(state.sid, state.namespace, drain_notice(policy, spec, rng))

        loop = asyncio.get_running_loop()
        return await drain_sessions(
            sessions,
            spec,
            deadline,
            tell,
            self._end_transport,
            loop.time,
        )

    async def shed_tick(self) -> int:
        """Disconnect what the policy's ``action: disconnect`` rules pick; returns how many."""
        engine = self.engine
        if not self._states or not any(
            rule.action is ShedAction.DISCONNECT for rule in engine.policy.shedding
        ):
            return 0
        now = time.monotonic()
        candidates = []
        for state in self._states.values():
            if not state.close_event:
                state.conn["connected_ms"] = int((now - state.connected_at) * 1000)
                candidates.append(state.conn)
        shed = 0
        per_rule: Counter[str] = Counter()
        for sid, payload in engine.connections_to_shed(candidates):
            chosen = self._states.get(sid)
            if chosen is None or chosen.close_event:
                continue
            rule = str(payload.get("policy", "shedding"))
            await self._close(chosen, payload, "shed", rule)
            per_rule[rule] += 1
            shed += 1
        for rule, count in per_rule.items():
            self.observer.shed(rule, "disconnect", count)
        return shed

    # -- connection-state recovery -----------------------------------------------------------

    def _conversation_of(self, sid: str) -> str | None:
        state = self._states.get(sid)
        return state.conn["conversation_id"] if state is not None else None

    async def _buffer_for_replay(self, event: str, data: dict[str, Any], target: Any) -> Buffered:
        return await self.recovery.buffer(event, data, target)

    # -- idle connections --------------------------------------------------------------------

    async def _reap(self) -> None:
        while True:
            policy = self.engine.policy
            idle = policy.connections.idle_timeout
            tick = min(_MAX_TICK, max(_MIN_TICK, idle / 4)) if idle else _MAX_TICK
            await asyncio.sleep(tick)
            try:
                await self._close_idle()
                self.recovery.index.prune(time.monotonic(), policy.recovery.max_disconnection)
                self.inbound.prune()
            except Exception:
                _log.exception("idle reaper tick failed")

    async def _close_idle(self) -> None:
        policy = self.engine.policy
        idle = policy.connections.idle_timeout
        if not idle:
            return
        deadline = time.monotonic() - idle
        for state in [s for s in self._states.values() if s.last_activity <= deadline]:
            if state.close_event:
                continue
            payload = IDLE_TIMEOUT.payload("connections/idle_timeout", backoff=backoff_for(policy))
            await self._close(state, payload, "idle_closed", "idle_timeout")

    async def _close(
        self, state: ConnectionState, payload: Mapping[str, Any], event: str, reason: str
    ) -> None:
        """Tell the client why, then disconnect it."""
        state.close_event, state.close_reason = event, reason
        try:
            await self._notify(state.sid, state.namespace, payload)
            await self.sio.disconnect(state.sid, namespace=state.namespace)
        except Exception:
            _log.exception("closing %s failed", state.sid)

    # -- packets refused before python-socketio decodes them -----------------------------------

    def _state_of(self, eio_sid: str, namespace: str) -> ConnectionState | None:
        sid = self.sio.manager.sid_from_eio_sid(eio_sid, namespace)
        return self._states.get(sid) if sid is not None else None

    async def _refuse_packet(
        self, eio_sid: str, namespace: str, ack: Any, payload: ClientPayload
    ) -> None:
        """Report a packet's refusal and answer it: as its ack, else as ``error_event``."""
        state = self._state_of(eio_sid, namespace)
        decision = Decision(Outcome.REJECT, payload["policy"], payload)
        self.observer.decision("event", decision, 0.0, state.conn if state else None)
        if ack is not None:
            packet = self.sio.packet_class(
                socketio.packet.ACK, namespace=namespace, id=ack, data=[dict(payload)]
            )
            await self.sio._send_packet(eio_sid, packet)
        elif state is not None:
            await self._notify(state.sid, state.namespace, payload)

    async def _close_connection(self, eio_sid: str, payload: ClientPayload) -> None:
        """Close an Engine.IO connection: each namespace hears why, then the transport ends
        once the client has read that (see :meth:`_end_transport`)."""
        for state in [s for s in self._states.values() if s.eio_sid == eio_sid]:
            if not state.close_event:
                await self._close(state, payload, "closed", "protocol_errors")
        self._spawn(self._end_transport(eio_sid))

    async def _end_transport(self, eio_sid: str) -> None:
        """Close an Engine.IO socket after what is queued for it was read, or CLOSE_DRAIN.

        Not Engine.IO's ``disconnect()``: it closes at once and then waits for the queue to
        drain, but a long-polling client's GET is refused once its socket is closed, so
        nothing queued (the notice saying why) would be read and the wait would never end;
        and a WebSocket would stay open until its writer timed out, the client's events
        still read.
        """
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_DRAIN
        while not socket.queue.empty() and not socket.closed and loop.time() < deadline:
            await asyncio.sleep(0.02)
        # Forgotten first, as Engine.IO forgets a closed socket it looks up: a request that
        # comes while the close runs is then an unknown session (400), not a lookup error.
        self.sio.eio.sockets.pop(eio_sid, None)
        try:
            await socket.close(wait=False, reason=self.sio.eio.reason.SERVER_DISCONNECT)
            if socket.upgraded:  # end the WebSocket writer, which then closes the socket
                socket.queue.put_nowait(None)
        except Exception:
            _log.exception("closing %s failed", eio_sid)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def attach(
    sio: Any,
    engine: Engine,
    *,
    observer: Observer | None = None,
    error_event: str = "policy_error",
    claims_loader: ClaimsLoader | HandshakeClaimsLoader | None = None,
) -> PolicyAdapter | SyncPolicyAdapter:
    """Install ``engine``'s policy on ``sio``; returns the adapter (one per server).

    ``sio`` is a ``socketio.AsyncServer`` (a :class:`PolicyAdapter` is returned) or a
    ``socketio.Server``, Flask-SocketIO's ``socketio.server`` included (a
    :class:`~policy_engine.adapter.sync_server.SyncPolicyAdapter`).

    ``claims_loader`` is the application's own check of who is connecting: a function of
    ``(environ, auth)`` or an object with ``async def load(handshake)``; it is the provider
    ``app`` of the policy's ``authentication`` section, or the only source of claims in a
    policy without one.
    """
    if getattr(sio, "policy_adapter", None) is not None:
        raise RuntimeError("a policy is already attached to this Socket.IO server")
    loader = environ_loader(claims_loader) if claims_loader is not None else None
    if isinstance(sio, socketio.Server):
        sync = SyncPolicyAdapter(
            sio, engine, observer=observer, error_event=error_event, claims_loader=loader
        )
        sync.authentication.prepare(engine.policy)
        sync.install()
        return sync
    adapter = PolicyAdapter(
        sio, engine, observer=observer, error_event=error_event, claims_loader=loader
    )
    adapter.authentication.prepare(engine.policy)
    adapter.install()
    return adapter
