"""The sync server's incoming half: every packet a client sends, sized and screened before
python-socketio decodes it, each event judged before its handler runs, the client answered
when the policy refuses or the handler fails, and the emit hook's rules per recipient.

As :mod:`~policy_engine.adapter.events` and :mod:`~policy_engine.adapter.inbound` do on the
async server, with the same screening (:func:`~policy_engine.adapter.inbound.screen`) and
the engine's synchronous verdict (``judge_event_now``, under the runner's lock on the memory
store). These are :class:`~policy_engine.adapter.sync_server.SyncPolicyAdapter`'s methods,
kept in their own module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from socketio import packet as sio_packet

from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.events import ack_values
from policy_engine.adapter.inbound import (
    BUFFER_HEADROOM,
    RESERVED_EVENTS,
    Limits,
    limits_of,
    screen,
)
from policy_engine.adapter.threads import EngineRunner
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import NO_GUARD, BreakerGuard, Engine, EventVerdict
from policy_engine.core.payload import PROTOCOL_INVALID, UNKNOWN_EVENT, ClientPayload
from policy_engine.language.contexts import Hook
from policy_engine.language.model import EvalFailureMode, PolicySet
from policy_engine.observe.logs import ProtocolErrorLog
from policy_engine.observe.observer import Observer

_log = logging.getLogger("policy_engine.adapter.attach")

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


class SyncEventDispatch:
    """The message, event and emit hooks of ``socketio.Server``."""

    sio: Any
    engine: Engine
    runner: EngineRunner
    observer: Observer
    error_event: str
    protocol_log: ProtocolErrorLog
    _states: dict[str, ConnectionState]
    _events_received: int
    _configured_buffer: int
    _limits: Limits
    _inbound: threading.local
    _emission: threading.local
    _binary_sizes: dict[str, int]
    _trigger: Callable[..., Any]
    _installed_trigger: Callable[..., Any]
    _event_original: Callable[..., Any]
    _handle_event_original: Callable[..., Any]
    _message_original: Callable[..., Any]
    _emit_original: Callable[..., Any]
    _send_eio_packet_original: Callable[..., Any]
    _not_handled: Any

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
