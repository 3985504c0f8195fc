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

import socketio
from socketio import packet as sio_packet

from policy_engine.adapter.admission import admit, advice_packet, retried_by_transport
from policy_engine.adapter.authentication import ConnectAuthentication
from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.connections import (
    handshake_conn,
    invalid_handshake,
    refusal,
    refused_by_app,
)
from policy_engine.adapter.cors import CorsPolicy
from policy_engine.adapter.events import ack_values
from policy_engine.adapter.gate import HandshakeGate
from policy_engine.adapter.identity import ClaimsLoader, IdentityError, identify
from policy_engine.adapter.inbound import (
    BUFFER_HEADROOM,
    RESERVED_EVENTS,
    Limits,
    limits_of,
    screen,
)
from policy_engine.adapter.threads import LOOP_TIMEOUT, EngineRunner, run_inline
from policy_engine.adapter.wsgi import WSGIApp, WSGIGate, handshake_environ
from policy_engine.core.admission import AdmissionQueue
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import NO_GUARD, BreakerGuard, Engine, EventVerdict
from policy_engine.core.payload import (
    IDLE_TIMEOUT,
    PROTOCOL_INVALID,
    UNKNOWN_EVENT,
    ClientPayload,
    backoff_for,
)
from policy_engine.language.contexts import Hook
from policy_engine.language.model import EvalFailureMode, PolicySet, ShedAction
from policy_engine.observe.logs import ProtocolErrorLog
from policy_engine.observe.observer import NullObserver, Observer

_log = logging.getLogger("policy_engine.adapter.attach")

_NO_CLAIMS: Mapping[str, Any] = {}
_ALLOW = Outcome.ALLOW
_DELAY = Outcome.DELAY
_monotonic = time.monotonic
_perf_counter = time.perf_counter


class SizedArgs(list[Any]):
    """An event's decoded arguments with the size of the packet they came in: python-socketio
    hands the same list to the thread that runs the event, where the hook reads it."""

    __slots__ = ("size_bytes",)

    def __init__(self, data: list[Any], size_bytes: int) -> None:
        super().__init__(data)
        self.size_bytes = size_bytes


class SyncPolicyAdapter:
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
        return WSGIGate(app, gate)

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

    # -- connect and disconnect --------------------------------------------------------------

    def _on_trigger(self, event: str, namespace: str, *args: Any) -> Any:
        if event == "connect" and args and args[0] not in self._states:
            try:
                return self._connect(namespace, args)
            except socketio.exceptions.ConnectionRefusedError:
                raise
            except Exception as exc:
                raise self._connect_fault(exc) from None
        if (
            event == "disconnect"
            and args
            and args[0] in self._states
            and not self.sio.manager.is_connected(args[0], namespace)
        ):
            return self._disconnect(namespace, args)
        return self._trigger(event, namespace, *args)

    def _connect(self, namespace: str, args: tuple[Any, ...]) -> Any:
        engine, runner = self.engine, self.runner
        sid, environ = args[0], handshake_environ(args[1])
        auth = args[2] if len(args) > 2 else None
        policy = engine.policy
        try:
            identity = identify(environ, auth, policy.identity, _NO_CLAIMS)
        except IdentityError as exc:
            raise invalid_handshake(exc, self.observer) from None
        claims_error: Exception | None = None
        try:
            claims, verified_user = self._authenticate(policy, namespace, environ, auth, identity)
        except Exception as exc:
            claims, verified_user, claims_error = {}, "", exc
        conn = handshake_conn(sid, namespace, identity, verified_user)
        started = _perf_counter()
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        try:
            decision = runner.run(engine.on_connect(conn, claims))
            if not decision.allowed:
                decision = self._admit(policy, decision, conn, claims, eio_sid)
        except BaseException:
            self._forget(conn)
            raise
        self.observer.decision("connect", decision, _perf_counter() - started, conn)
        if not decision.allowed:
            self._forget(conn)
            if retried_by_transport(decision):
                self._close_transport(eio_sid, decision.payload or {})
            raise refusal(decision.payload)
        now = _monotonic()
        state = ConnectionState(sid, namespace, eio_sid, conn, claims, now, now)
        self._states[sid] = state
        try:
            if decision.outcome is _DELAY:
                time.sleep(decision.delay)
            if not self._session_open(state):
                raise self._abandoned(state, handler_ran=False)
            result = self._accept(state, args, claims_error, bool(verified_user))
            if not self._session_open(state):
                raise self._abandoned(state, handler_ran=True)
        except socketio.exceptions.ConnectionRefusedError:
            self._untrack(state)
            raise
        except Exception as exc:
            raise self._connect_fault(exc, state) from None
        except BaseException:
            self._untrack(state)
            raise
        self.observer.connection("opened", conn)
        return result

    def _admit(
        self,
        policy: PolicySet,
        decision: Decision,
        conn: dict[str, Any],
        claims: Mapping[str, Any],
        eio_sid: str,
    ) -> Decision:
        """The admission queue's verdict on a refused connect (``admission.admit``): without
        a queue it only sizes the advice and remembers the refusal for the gate, which never
        waits, so it runs inline; a queue's wait runs on the loop thread, where the queue's
        turns are kept."""
        engine, runner = self.engine, self.runner
        activation = {"conn": conn, "claims": claims, "load": engine.load}

        async def judge() -> Decision:
            if not runner.inline:
                return await engine.on_connect(conn, claims)
            with runner.lock:
                return run_inline(engine.on_connect(conn, claims))

        waiting = admit(
            self.admission,
            policy,
            decision,
            activation,
            judge,
            eio_sid,
            lambda: self._eio_open(eio_sid),
        )
        if policy.connections.queue.max_wait > 0:
            return runner.on_loop(waiting, LOOP_TIMEOUT + policy.connections.queue.max_wait)
        with self._admission_lock:
            return run_inline(waiting)

    def _eio_open(self, eio_sid: str) -> bool:
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is None:
            return eio_sid in self.sio.environ
        return not socket.closing and not socket.closed

    def _authenticate(
        self,
        policy: PolicySet,
        namespace: str,
        environ: Mapping[str, Any],
        auth: Any,
        identity: Any,
    ) -> tuple[dict[str, Any], str]:
        """The handshake's claims. Verifiers may download keys, and an application's
        ``async`` loader may wait: those run on the loop thread; a plain loader inline."""
        call = self.authentication.authenticate(policy, namespace, environ, auth, identity)
        if policy.authentication.enabled or self._async_loader:
            return self.runner.on_loop(call)
        return run_inline(call)

    def _accept(
        self,
        state: ConnectionState,
        args: tuple[Any, ...],
        failure: BaseException | None,
        verified: bool,
    ) -> Any:
        """The application's connect handler; any failure becomes a classified refusal."""
        result: Any = None
        if failure is None:
            try:
                result = self._call_connect_handler(state.namespace, args)
            except Exception as exc:
                failure = exc
            else:
                if result is False:
                    failure = socketio.exceptions.ConnectionRefusedError()
        if failure is not None:
            self._untrack(state)
            raise self._connect_failed(failure, state)
        if verified:
            self.runner.run(self.engine.clear_auth_failures(state.conn))
        return result

    def _call_connect_handler(self, namespace: str, args: tuple[Any, ...]) -> Any:
        """The handler once, whichever signature it has (see the async adapter's)."""
        try:
            return self._trigger("connect", namespace, *args)
        except TypeError as first:
            other: tuple[Any, ...]
            if len(args) == 2:
                other = (*args, None)
            elif len(args) == 3 and args[2] is None:
                other = args[:2]
            else:
                raise
            try:
                return self._trigger("connect", namespace, *other)
            except TypeError:
                raise first from None

    def _connect_failed(self, exc: BaseException, state: ConnectionState) -> Exception:
        engine = self.engine
        classification, contract, error = engine.on_error(
            exc, Hook.CONNECT, state.conn, state.claims
        )
        payload = refused_by_app(contract, exc)
        self.observer.error("connect", classification, error, payload, state.conn)
        if engine.counts_as_auth_failure(classification):
            self.runner.run(engine.record_auth_failure(state.conn))
        return refusal(payload)

    def _connect_fault(self, exc: Exception, state: ConnectionState | None = None) -> Exception:
        _log.error("connect hook failed", exc_info=exc)
        if state is not None:
            self._untrack(state)
        conn = state.conn if state is not None else None
        classification, payload, error = self.engine.on_error(exc, Hook.CONNECT, conn)
        self.observer.error("connect", classification, error, payload, conn)
        return refusal(payload)

    def _abandoned(self, state: ConnectionState, *, handler_ran: bool) -> Exception:
        """A connect whose session ended before it was accepted: released, never accepted."""
        self._untrack(state)
        if handler_ran and not state.disconnect_heard:
            state.disconnect_heard = True
            try:
                self._trigger(
                    "disconnect", state.namespace, state.sid, self.sio.reason.TRANSPORT_CLOSE
                )
            except Exception as exc:
                self._report_error(exc, Hook.DISCONNECT, state, None)
        abandoned: Exception = socketio.exceptions.ConnectionRefusedError()
        return abandoned

    def _session_open(self, state: ConnectionState) -> bool:
        """Whether the connection is still tracked and its Engine.IO session still up. A
        session python-socketio knows of but Engine.IO does not is Flask-SocketIO's test
        client's, which has no transport: up while python-socketio keeps its environ."""
        return self._states.get(state.sid) is state and self._eio_open(state.eio_sid)

    def _close_transport(self, eio_sid: str, payload: Mapping[str, Any]) -> None:
        """Refuse a connect so that a plain socket.io-client retries it: the advice, then
        the Engine.IO session closed (see ``admission``)."""
        eio = self.sio.eio
        socket = eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            return
        eio.send(eio_sid, advice_packet(payload))
        socket.close(wait=False)

    def _disconnect(self, namespace: str, args: tuple[Any, ...]) -> Any:
        state = self._states[args[0]]
        state.disconnect_heard = True
        try:
            return self._trigger("disconnect", namespace, *args)
        except Exception as exc:
            self._report_error(exc, Hook.DISCONNECT, state, None)
            return None
        finally:
            reason = str(args[1]) if len(args) > 1 else ""
            self._untrack(state, reason, closed=True)

    def _untrack(self, state: ConnectionState, reason: str = "", *, closed: bool = False) -> None:
        """Release what a connection held, once, whichever path ends it first."""
        if self._states.get(state.sid) is not state:
            return
        if self._states.pop(state.sid, None) is not state:
            return  # another thread released it between the two lines
        self._forget(state.conn)
        self.admission.released()
        if closed:
            self.observer.connection(
                state.close_event or "closed", state.conn, state.close_reason or reason
            )

    def _forget(self, conn: Mapping[str, Any]) -> None:
        try:
            self.runner.run(self.engine.on_disconnect(conn))
        except Exception:
            _log.exception("releasing connection %s failed", conn["sid"])

    def _session_ended(self, eio_sid: str, *args: Any) -> Any:
        """Engine.IO's disconnect: python-socketio's, then whatever it left tracked (a sid
        still in its connect handler gets no disconnect from python-socketio)."""
        try:
            return self._eio_disconnect_original(eio_sid, *args)
        finally:
            self._binary_sizes.pop(eio_sid, None)
            with self._admission_lock:
                self.admission.abandon(eio_sid)
            # Copied in one call first: other threads add and remove connections meanwhile.
            for state in list(self._states.values()):
                if state.eio_sid == eio_sid:
                    self._untrack(state)

    # -- packets, before python-socketio decodes them ----------------------------------------

    def _align(self, policy: PolicySet) -> Limits:
        """This policy's limits; Engine.IO's buffer is raised to make its sizes reachable."""
        limits = limits_of(policy)
        self.sio.eio.max_http_buffer_size = max(
            self._configured_buffer, BUFFER_HEADROOM * limits.largest
        )
        return limits

    def _on_message(self, eio_sid: str, data: Any) -> None:
        """python-socketio's ``_handle_eio_message``: sized, screened, then handed on."""
        limits = self._limits
        if limits.policy is not self.engine.policy:
            limits = self._limits = self._align(self.engine.policy)
        size = len(data) if type(data) is not str or data.isascii() else len(data.encode())
        if type(data) is str and (
            size > limits.smallest or data.count("[") + data.count("{") > limits.max_depth
        ):
            screened = screen(data, size, limits)
            if screened is not None:
                namespace, ack, payload, too_deep = screened
                if too_deep:
                    self._fault(eio_sid, "too_deep", None)
                if data[:1] in "25":  # an event: answered; an ack: nobody waits for it
                    self._refuse_packet(eio_sid, namespace, ack, payload)
                return
        pending = eio_sid in self.sio._binary_packet
        if pending:
            size += self._binary_sizes.pop(eio_sid, 0)
        self._inbound.size = size
        try:
            self._message_original(eio_sid, data)
        except Exception as exc:  # client input python-socketio could not read
            self._fault(eio_sid, "malformed", exc)
        if eio_sid in self.sio._binary_packet:
            self._binary_sizes[eio_sid] = size  # its attachments add to it

    def _sized_event(self, eio_sid: str, namespace: str | None, ack: Any, data: Any) -> None:
        """python-socketio's ``_handle_event``, given the arguments with their packet's size;
        an event python-socketio would misread is refused here."""
        if type(data) is not list or not data or type(data[0]) is not str:
            self._fault(eio_sid, "malformed_event", None)
            return
        if data[0] in RESERVED_EVENTS:
            detail = f"{data[0]!r} is a reserved event name"
            payload = PROTOCOL_INVALID.payload("connections/protocol", detail=detail)
            self._refuse_packet(eio_sid, namespace or "/", ack, payload)
            self._fault(eio_sid, "reserved_event", None)
            return
        size = getattr(self._inbound, "size", 0)
        self._handle_event_original(eio_sid, namespace, ack, SizedArgs(data, size))

    def _fault(self, eio_sid: str, kind: str, exc: BaseException | None) -> None:
        detail = f"{type(exc).__name__}: {exc}"[:200] if exc is not None else ""
        self.protocol_log.report(eio_sid, kind, detail, _monotonic())

    def _refuse_packet(
        self, eio_sid: str, namespace: str, ack: Any, payload: ClientPayload
    ) -> None:
        """Report a packet's refusal and answer it: as its ack, else as ``error_event``."""
        sid = self.sio.manager.sid_from_eio_sid(eio_sid, namespace)
        state = self._states.get(sid) if sid is not None else None
        decision = Decision(Outcome.REJECT, payload["policy"], payload)
        self.observer.decision("event", decision, 0.0, state.conn if state else None)
        if ack is not None:
            self.sio._send_packet(
                eio_sid,
                self.sio.packet_class(
                    sio_packet.ACK, namespace=namespace, id=ack, data=[dict(payload)]
                ),
            )
        elif state is not None:
            self._notify(state.sid, state.namespace, payload)

    # -- events ------------------------------------------------------------------------------

    def _on_event(  # noqa: PLR0917 (python-socketio's signature)
        self, server: Any, sid: str, eio_sid: str, data: Any, namespace: str, ack: Any
    ) -> None:
        """python-socketio's ``_handle_event_internal``, with the policy around the handler."""
        state = self._states.get(sid)
        if state is None:
            self._event_original(server, sid, eio_sid, data, namespace, ack)
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
            "size_bytes": getattr(data, "size_bytes", 0),
            "priority": "",
            "has_ack": ack is not None,
            "payload": data[1] if size == 2 else (None if size == 1 else data[1:]),
        }
        guard = NO_GUARD
        try:
            started = _perf_counter()
            decision, guard, waited = self._judge(conn, claims, event)
            outcome = decision.outcome
            for name, transition in guard.transitions:
                self.observer.breaker_transition(name, transition)
            self.observer.decision("event", decision, _perf_counter() - started - waited, conn)
        except Exception as exc:
            if self._policy_fault(exc, server, state, event, ack):
                return
            outcome = _ALLOW
        if outcome is not _ALLOW and outcome is not _DELAY:
            self._answer(server, state, ack, decision.payload, notify=outcome is not Outcome.DROP)
            return
        trigger = self._trigger
        if server._trigger_event is not self._installed_trigger:
            trigger = server._trigger_event  # something wrapped us (the admin UI): keep it
        try:
            result = trigger(data[0], namespace, sid, *data[1:])
        except Exception as exc:
            classification, payload, error = self._report_error(exc, Hook.EVENT, state, event)
            self._answer(server, state, ack, payload, notify=True)
            if guard.permits:
                self._after_call(guard, state, event, classification, error)
            return
        if ack is not None:
            if result is self._not_handled:
                if engine.policy.connections.protocol.answer_unknown_events:
                    unknown = UNKNOWN_EVENT.payload("connections/protocol")
                    self._answer(server, state, ack, unknown, notify=False)
            else:
                server._send_packet(
                    eio_sid,
                    server.packet_class(
                        sio_packet.ACK, namespace=namespace, id=ack, data=ack_values(result)
                    ),
                )
        if guard.permits:
            self._after_call(guard, state, event, None, None)

    def _judge(
        self, conn: Mapping[str, Any], claims: Mapping[str, Any], event: dict[str, Any]
    ) -> tuple[Decision, BreakerGuard, float]:
        """The decision, the breaker permits held and the seconds spent delaying: the
        engine's one-call verdict, then what must wait (a store, a delay, the permits)."""
        engine, runner = self.engine, self.runner
        if runner.inline:
            with runner.lock:
                verdict = engine.judge_event_now(conn, claims, event)
        else:
            verdict = runner.call(engine.judge_event_now, conn, claims, event)
        if type(verdict) is EventVerdict and verdict.guard is not None:
            return verdict.decision, verdict.guard, 0.0
        if isinstance(verdict, EventVerdict):
            decision = verdict.decision
        else:
            decision = runner.run(engine.settle_event(verdict))
        waited = 0.0
        outcome = decision.outcome
        if outcome is _DELAY:
            waited = decision.delay
            time.sleep(waited)
        if outcome is not _ALLOW and outcome is not _DELAY:
            return decision, NO_GUARD, waited
        permits = runner.run(engine.before_call(conn, claims, event))
        if isinstance(permits, BreakerGuard):
            return decision, permits, waited
        return permits, NO_GUARD, waited

    def _policy_fault(
        self,
        exc: Exception,
        server: Any,
        state: ConnectionState,
        event: Mapping[str, Any],
        ack: Any,
    ) -> bool:
        """A fault of the policy machinery: reported; refused only under ``fail_closed``."""
        _, payload, _ = self._report_error(exc, Hook.EVENT, state, event)
        if self.engine.policy.defaults.on_eval_error is not EvalFailureMode.FAIL_CLOSED:
            return False
        self._answer(server, state, ack, payload, notify=True)
        return True

    def _report_error(
        self,
        exc: BaseException,
        hook: Hook,
        state: ConnectionState,
        event: Mapping[str, Any] | None,
    ) -> tuple[Classification, ClientPayload, dict[str, Any]]:
        classification, payload, error = self.engine.on_error(
            exc, hook, state.conn, state.claims, event
        )
        self.observer.error(hook.value, classification, error, payload, state.conn)
        return classification, payload, error

    def _after_call(
        self,
        guard: BreakerGuard,
        state: ConnectionState,
        event: Mapping[str, Any],
        classification: Classification | None,
        error: Mapping[str, Any] | None,
    ) -> None:
        try:
            transitions = self.runner.run(
                self.engine.after_call(guard, state.conn, event, classification, error)
            )
        except Exception:
            _log.exception("recording a call outcome failed")
            return
        for name, transition in transitions:
            self.observer.breaker_transition(name, transition)

    def _answer(
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
            server._send_packet(
                state.eio_sid,
                server.packet_class(
                    sio_packet.ACK, namespace=state.namespace, id=ack, data=[dict(payload)]
                ),
            )
        elif notify:
            self._notify(state.sid, state.namespace, payload)

    def _notify(self, sid: str, namespace: str, payload: Mapping[str, Any]) -> None:
        """Send ``error_event`` to one client, past the emit hook's rules."""
        self._emit_original(
            self.error_event, dict(payload), to=sid, namespace=namespace, ignore_queue=True
        )

    # -- emits -------------------------------------------------------------------------------

    def _emit(  # noqa: PLR0917 (Server.emit's signature)
        self,
        event: str,
        data: Any = None,
        to: Any = None,
        room: Any = None,
        skip_sid: Any = None,
        namespace: str | None = None,
        callback: Any = None,
        ignore_queue: bool = False,
    ) -> Any:
        """``Server.emit``: the emit hook's rules judge each recipient's packet."""
        if not self.engine.policy.by_hook.limits_or_sheds(Hook.EMIT):
            return self._emit_original(
                event, data, to=to, room=room, skip_sid=skip_sid, namespace=namespace,
                callback=callback, ignore_queue=ignore_queue,
            )  # fmt: skip
        self._emission.current = (event, namespace or "/", data)
        try:
            return self._emit_original(
                event, data, to=to, room=room, skip_sid=skip_sid, namespace=namespace,
                callback=callback, ignore_queue=ignore_queue,
            )  # fmt: skip
        finally:
            self._emission.current = None

    def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        emission = getattr(self._emission, "current", None)
        if emission is not None and not self._emit_allowed(eio_sid, emission, eio_pkt):
            return
        self._send_eio_packet_original(eio_sid, eio_pkt)

    def _emit_allowed(self, eio_sid: str, emission: tuple[str, str, Any], eio_pkt: Any) -> bool:
        """The emit hook's rules for one recipient: whether its packet may go."""
        name, namespace, data = emission
        sid = self.sio.manager.sid_from_eio_sid(eio_sid, namespace)
        state = self._states.get(sid) if sid is not None else None
        if state is None:
            return True
        body = eio_pkt.data
        event = {
            "name": name,
            "size_bytes": len(body) if isinstance(body, str | bytes) else 0,
            "priority": "",
            "has_ack": False,
            "payload": data,
        }
        started = _perf_counter()
        decision = self.runner.run(self.engine.on_emit(state.conn, state.claims, event))
        self.observer.decision("emit", decision, _perf_counter() - started, state.conn)
        if decision.outcome is _DELAY:
            time.sleep(decision.delay)
            return True
        if decision.allowed:
            return True
        self.observer.outbound_drop(state.conn, name, decision.rule or "emit")
        return False


async def _unused_asgi_app(*_: Any) -> None:
    """The gate's ASGI application, never called: the WSGI gate only asks it to judge."""
