"""The Socket.IO adapter: applies the engine's decisions at python-socketio's hook points.

:func:`attach` installs the policy on an existing ``socketio.AsyncServer`` by replacing a few
methods on the server instance, as ``sio.instrument()`` does, so no application handler
changes. Which methods, and why each, is in ``docs/architecture.md``; the outgoing half
(``emit`` and every packet sent) is in :mod:`policy_engine.adapter.outgoing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import socketio
from socketio import packet as sio_packet

from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.cors import CorsPolicy
from policy_engine.adapter.gate import HandshakeGate
from policy_engine.adapter.identity import ClaimsLoader, identify, load_claims
from policy_engine.adapter.outgoing import Buffered, Outgoing, replayed_up_to
from policy_engine.adapter.recovery import Recovery
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import (
    NO_GUARD,
    BreakerGuard,
    Engine,
    EventVerdict,
    PendingEvent,
    conn_context,
)
from policy_engine.core.payload import IDLE_TIMEOUT, ClientPayload, backoff_for
from policy_engine.language.contexts import Hook
from policy_engine.language.model import ShedAction
from policy_engine.observe.observer import NullObserver, Observer

__all__ = ["ClaimsLoader", "ConnectionState", "PolicyAdapter", "attach"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_log = logging.getLogger("policy_engine.adapter.attach")

# The size of the packet being handled, set where Engine.IO hands it over and read by the
# event hook in the task python-socketio starts for it (tasks copy the context).
_INBOUND_SIZE: ContextVar[int] = ContextVar("policy_engine_inbound_size", default=0)
_ALLOW = Outcome.ALLOW
_DELAY = Outcome.DELAY
_monotonic = time.monotonic
_perf_counter = time.perf_counter
_MIN_TICK = 0.05
_MAX_TICK = 1.0


class PolicyAdapter:
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
        self._states: dict[str, ConnectionState] = {}
        self._events_received = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
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
        sio.packet_class = _measured(sio.packet_class)
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
        gate = HandshakeGate(
            inner,
            self.engine,
            socketio_path=socketio_path,
            observer=self.observer,
            cors=CorsPolicy.of(self.sio.eio),
        )
        return _Lifespan(gate, self.start, self.stop)

    async def start(self) -> None:
        """Start the idle reaper (idempotent); outbound pumps start on demand."""
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

    # -- incoming packets --------------------------------------------------------------------

    async def _on_trigger(self, event: str, namespace: str, *args: Any) -> Any:
        if event == "connect" and args and args[0] not in self._states:
            try:
                return await self._connect(namespace, args)
            except socketio.exceptions.ConnectionRefusedError:
                raise
            except Exception as exc:
                # Anything else would leave the client waiting for "Unexpected connection
                # error": even a fault of the policy machinery ends in a classified refusal.
                raise await self._connect_fault(args[0], exc) from None
        if event == "disconnect" and args and args[0] in self._states:
            return await self._disconnect(namespace, args)
        return await self._trigger(event, namespace, *args)

    # -- connect -----------------------------------------------------------------------------

    async def _connect(self, namespace: str, args: tuple[Any, ...]) -> Any:
        engine = self.engine
        sid, environ = args[0], args[1]
        auth = args[2] if len(args) > 2 else None
        claims_error: Exception | None = None
        try:
            claims = await load_claims(environ, auth, self.claims_loader)
        except Exception as exc:
            # Judged after the policy: a throttled client must hear AUTH_THROTTLED.
            claims, claims_error = {}, exc
        identity = identify(environ, auth, engine.policy.identity, claims)
        conn = conn_context(
            sid=sid,
            namespace=namespace,
            ip=identity.ip,
            user_id=identity.user_id,
            conversation_id=identity.conversation_id,
            transport=identity.transport,
            origin=identity.origin,
            user_agent=identity.user_agent,
            headers=dict(identity.headers),
            query=dict(identity.query),
        )
        started = time.perf_counter()
        decision = await engine.on_connect(conn, claims)
        self.observer.decision("connect", decision, time.perf_counter() - started, conn)
        if decision.outcome is Outcome.DELAY:
            await asyncio.sleep(decision.delay)
        elif not decision.allowed:
            raise _refusal(decision.payload)
        now = time.monotonic()
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        state = ConnectionState(sid, namespace, eio_sid, conn, claims, now, now)
        self._track(state)
        latest = identity.latest_event_id
        recovering = (
            latest >= 0 and engine.policy.recovery.enabled and bool(conn["conversation_id"])
        )
        link = self.outgoing.links.get(eio_sid) if recovering else None
        if link is not None:
            # From here on, live events wait: the replay must reach the client first, even
            # those the application's own connect handler emits.
            link.outbox.hold()
        replayed_to = latest
        try:
            result = await self._accept(state, args, claims_error)
            if recovering:
                replayed_to = await self.recovery.recover(sid, namespace, conn, latest)
        finally:
            if link is not None:
                link.outbox.release(replayed_up_to(conn["conversation_id"], replayed_to))
        self.observer.connection("opened", conn)
        return result

    async def _connect_fault(self, sid: str, exc: Exception) -> Exception:
        _log.error("connect hook failed", exc_info=exc)
        state = self._states.get(sid)
        if state is not None:
            await self._untrack(state)
        conn = state.conn if state is not None else None
        classification, payload, error = self.engine.on_error(exc, Hook.CONNECT, conn)
        self.observer.error("connect", classification, error, payload, conn)
        return _refusal(payload)

    async def _accept(
        self, state: ConnectionState, args: tuple[Any, ...], failure: BaseException | None
    ) -> Any:
        """Run the application's connect handler; any failure becomes a classified refusal."""
        result: Any = None
        if failure is None:
            try:
                result = await self._call_connect_handler(state.namespace, args)
            except Exception as exc:
                failure = exc
            else:
                if result is False:
                    failure = socketio.exceptions.ConnectionRefusedError()
        if failure is not None:
            await self._untrack(state)
            raise await self._connect_failed(failure, state.conn, state.claims)
        await self.engine.clear_auth_failures(state.conn)
        return result

    async def _call_connect_handler(self, namespace: str, args: tuple[Any, ...]) -> Any:
        """Run the application's handler once, whichever signature it has.

        Without ``auth``, python-socketio tries ``connect(sid, environ, None)`` and, on a
        ``TypeError``, ``connect(sid, environ)`` (before 5.12, the other way round). Doing
        that retry here keeps the policy to one evaluation per handshake.
        """
        try:
            return await self._trigger("connect", namespace, *args)
        except TypeError as first:
            other: tuple[Any, ...]
            if len(args) == 2:
                other = (*args, None)
            elif len(args) == 3 and args[2] is None:
                other = args[:2]
            else:
                raise
            try:
                return await self._trigger("connect", namespace, *other)
            except TypeError:
                raise first from None

    async def _connect_failed(
        self, exc: BaseException, conn: dict[str, Any], claims: Mapping[str, Any]
    ) -> Exception:
        """The refusal a failed connect handler becomes: classified, and counted if auth."""
        engine = self.engine
        classification, contract, error = engine.on_error(exc, Hook.CONNECT, conn, claims)
        payload: dict[str, Any] = dict(contract)
        app_refusal = getattr(exc, "error_args", None)
        if isinstance(app_refusal, Mapping):
            # An explicit refusal: its message was written for the client.
            payload = {**payload, "message": str(app_refusal.get("message", payload["message"]))}
            if "data" in app_refusal:
                payload["data"] = app_refusal["data"]
        self.observer.error("connect", classification, error, payload, conn)
        if engine.counts_as_auth_failure(classification):
            await engine.record_auth_failure(conn)
        return _refusal(payload)

    # -- disconnect --------------------------------------------------------------------------

    async def _disconnect(self, namespace: str, args: tuple[Any, ...]) -> Any:
        state = self._states[args[0]]
        try:
            return await self._trigger("disconnect", namespace, *args)
        except Exception as exc:
            self._report_error(exc, Hook.DISCONNECT, state, None)
            return None
        finally:
            reason = str(args[1]) if len(args) > 1 else ""
            await self._untrack(state, reason, closed=True)

    def _track(self, state: ConnectionState) -> None:
        self._states[state.sid] = state
        self.outgoing.track(state)
        conversation = state.conn["conversation_id"]
        if conversation:
            self.recovery.index.join(conversation)

    async def _untrack(
        self, state: ConnectionState, reason: str = "", *, closed: bool = False
    ) -> None:
        """Release everything a connection held; ``closed``: it had been accepted."""
        if self._states.get(state.sid) is state:
            del self._states[state.sid]
        self.outgoing.untrack(state)
        conversation = state.conn["conversation_id"]
        if conversation:
            self.recovery.index.leave(conversation, time.monotonic())
        try:
            await self.engine.on_disconnect(state.conn)
        except Exception:
            _log.exception("releasing connection %s failed", state.sid)
        if closed:
            self.observer.connection(
                state.close_event or "closed", state.conn, state.close_reason or reason
            )

    # -- events ------------------------------------------------------------------------------

    async def _on_event(  # noqa: PLR0917 (python-socketio's signature)
        self, server: Any, sid: str, eio_sid: str, data: list[Any], namespace: str, ack: Any
    ) -> None:
        """python-socketio's ``_handle_event_internal``, with the policy around the handler."""
        state = self._states.get(sid)
        if state is None:
            await self._event_original(server, sid, eio_sid, data, namespace, ack)
            return
        engine = self.engine
        self._events_received += 1
        now = _monotonic()
        state.last_activity = now
        conn = state.conn
        if engine.policy.reads_connection_age:
            conn["connected_ms"] = int((now - state.connected_at) * 1000)
        claims = state.claims
        size = len(data)
        event = {
            "name": data[0],
            "size_bytes": _INBOUND_SIZE.get(),
            "priority": "",
            "has_ack": ack is not None,
            "payload": data[1] if size == 2 else (None if size == 1 else data[1:]),
        }
        guard = NO_GUARD
        try:
            started = _perf_counter()
            verdict = engine.judge_event_now(conn, claims, event)
            waited = 0.0
            if type(verdict) is EventVerdict and verdict.guard is not None:
                decision, guard = verdict.decision, verdict.guard
            else:
                decision, guard, waited = await self._judge_waiting(conn, claims, event, verdict)
            outcome = decision.outcome
            for name, transition in guard.transitions:
                self.observer.breaker_transition(name, transition)
            self.observer.decision("event", decision, _perf_counter() - started - waited, conn)
        except Exception as exc:
            # A fault in the policy machinery must not take the application down with it.
            self._report_error(exc, Hook.EVENT, state, event)
            outcome = _ALLOW
        if outcome is not _ALLOW and outcome is not _DELAY:
            await self._answer(
                server, state, ack, decision.payload, notify=outcome is not Outcome.DROP
            )
            return
        trigger = self._trigger
        if server._trigger_event is not self._installed_trigger:
            trigger = server._trigger_event  # something wrapped us (the admin UI): keep it
        try:
            result = await trigger(data[0], namespace, sid, *data[1:])
        except Exception as exc:
            classification, payload, error = self._report_error(exc, Hook.EVENT, state, event)
            if guard.permits:
                await self._after_call(guard, state, event, classification, error)
            await self._answer(server, state, ack, payload, notify=True)
            return
        if guard.permits:
            await self._after_call(guard, state, event, None, None)
        if ack is not None and result is not self._not_handled:
            await server._send_packet(
                eio_sid,
                server.packet_class(
                    sio_packet.ACK, namespace=namespace, id=ack, data=_ack_values(result)
                ),
            )

    async def _judge_waiting(
        self,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
        verdict: EventVerdict | PendingEvent,
    ) -> tuple[Decision, BreakerGuard, float]:
        """The verdict when reaching it awaits: a store, or a shedding delay before permits.

        ``verdict`` is what :meth:`Engine.judge_event_now` could decide without waiting.
        Returns the decision, the permits held and the seconds spent delaying, which are
        not part of the decision's own latency.
        """
        engine = self.engine
        if isinstance(verdict, EventVerdict):
            decision = verdict.decision
        else:
            decision = await engine.settle_event(verdict)
        waited = 0.0
        outcome = decision.outcome
        if outcome is _DELAY:
            waited = decision.delay
            await asyncio.sleep(waited)
        if outcome is not _ALLOW and outcome is not _DELAY:
            return decision, NO_GUARD, waited
        permits = await engine.before_call(conn, claims, event)
        if isinstance(permits, BreakerGuard):
            return decision, permits, waited
        return permits, NO_GUARD, waited

    def _report_error(
        self,
        exc: BaseException,
        hook: Hook,
        state: ConnectionState,
        event: Mapping[str, Any] | None,
    ) -> tuple[Classification, ClientPayload, dict[str, Any]]:
        """Classify an exception and report it with its correlation id."""
        classification, payload, error = self.engine.on_error(
            exc, hook, state.conn, state.claims, event
        )
        self.observer.error(hook.value, classification, error, payload, state.conn)
        return classification, payload, error

    async def _after_call(
        self,
        guard: BreakerGuard,
        state: ConnectionState,
        event: Mapping[str, Any],
        classification: Classification | None,
        error: Mapping[str, Any] | None,
    ) -> None:
        try:
            transitions = await self.engine.after_call(
                guard, state.conn, event, classification, error
            )
        except Exception:
            _log.exception("recording a call outcome failed")
            return
        for name, transition in transitions:
            self.observer.breaker_transition(name, transition)

    async def _answer(
        self,
        server: Any,
        state: ConnectionState,
        ack: Any,
        payload: Mapping[str, Any] | None,
        *,
        notify: bool,
    ) -> None:
        """Give the client the payload: as the ack it asked for, else as ``error_event``."""
        if payload is None:
            return
        if ack is not None:
            await server._send_packet(
                state.eio_sid,
                server.packet_class(
                    sio_packet.ACK, namespace=state.namespace, id=ack, data=[dict(payload)]
                ),
            )
        elif notify:
            await self._notify(state.sid, state.namespace, payload)

    async def _notify(self, sid: str, namespace: str, payload: Mapping[str, Any]) -> None:
        """Send ``error_event`` to one client at critical priority (dropped last, if ever)."""
        await self.outgoing.notify(self.error_event, sid, namespace, dict(payload))

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

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Lifespan:
    """Runs the adapter's start/stop around the wrapped application's own lifespan."""

    def __init__(
        self,
        app: ASGIApp,
        startup: Callable[[], Awaitable[None]],
        shutdown: Callable[[], Awaitable[None]],
    ) -> None:
        self.app = app
        self.startup = startup
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def hooked() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        await self.app(scope, hooked, send)


def _measured(packet_class: type[Any]) -> type[Any]:
    """The server's packet class, noting each received packet's size as it is decoded.

    ``event.size_bytes`` is the Socket.IO packet as received: its encoded length in bytes
    (event name, ack id, namespace and JSON payload included), plus the length of every
    binary attachment. The server decodes each incoming packet with ``packet_class`` (the
    class its ``serializer`` option names), synchronously, in the task that then starts
    the event's handler task, which inherits the size through a context variable. A text
    packet is ASCII nearly always, which ``isascii()`` tells in O(1); only otherwise is it
    encoded to count. Attachments arrive as further messages on the same transport task.
    """

    decode = packet_class.decode
    add_attachment = packet_class.add_attachment

    class MeasuredPacket(packet_class):  # type: ignore[misc]
        def decode(self, encoded_packet: Any) -> Any:
            if type(encoded_packet) is str:
                size = len(encoded_packet if encoded_packet.isascii() else encoded_packet.encode())
            else:
                size = len(encoded_packet)  # a whole packet in binary (a msgpack server)
            _INBOUND_SIZE.set(size)
            return decode(self, encoded_packet)

        def add_attachment(self, attachment: Any) -> Any:
            _INBOUND_SIZE.set(_INBOUND_SIZE.get() + len(attachment))
            return add_attachment(self, attachment)

    MeasuredPacket.__name__ = MeasuredPacket.__qualname__ = f"Measured{packet_class.__name__}"
    return MeasuredPacket


def _refusal(payload: Mapping[str, Any] | None) -> Exception:
    """What python-socketio turns into ``connect_error`` ``{'message': ..., 'data': ...}``."""
    data = dict(payload or {})
    refusal: Exception = socketio.exceptions.ConnectionRefusedError(
        str(data.get("message", "Connection refused.")), data
    )
    return refusal


def _ack_values(result: Any) -> list[Any]:
    """A handler's return value as ack arguments, as python-socketio sends them."""
    if result is None:
        return []
    if isinstance(result, tuple):
        return list(result)
    return [result]


def attach(
    sio: Any,
    engine: Engine,
    *,
    observer: Observer | None = None,
    error_event: str = "policy_error",
    claims_loader: ClaimsLoader | None = None,
) -> PolicyAdapter:
    """Install ``engine``'s policy on ``sio``; returns the adapter (one per server)."""
    if getattr(sio, "policy_adapter", None) is not None:
        raise RuntimeError("a policy is already attached to this Socket.IO server")
    adapter = PolicyAdapter(
        sio, engine, observer=observer, error_event=error_event, claims_loader=claims_loader
    )
    adapter.install()
    return adapter
