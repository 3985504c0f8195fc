"""The incoming-event dispatch: each event judged, its handler run between the breakers'
permits, and the client answered when the policy refuses or the handler fails.

This is the per-event hot path: the verdict is reached in one plain call whenever the
state can answer without I/O, and only what must wait is awaited. These are
:class:`~policy_engine.adapter.attach.PolicyAdapter`'s methods, kept in their own module;
being inherited, they cost no extra call per event.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from socketio import packet as sio_packet

from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.inbound import INBOUND_SIZE
from policy_engine.adapter.outgoing import Outgoing
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import NO_GUARD, BreakerGuard, Engine, EventVerdict, PendingEvent
from policy_engine.core.payload import UNKNOWN_EVENT, ClientPayload
from policy_engine.language.contexts import Hook
from policy_engine.language.model import EvalFailureMode
from policy_engine.observe.observer import Observer

# The adapter's one logger, whichever of its modules reports.
_log = logging.getLogger("policy_engine.adapter.attach")

_ALLOW = Outcome.ALLOW
_DELAY = Outcome.DELAY
_monotonic = time.monotonic
_perf_counter = time.perf_counter
_is_coroutine_function = inspect.iscoroutinefunction


class EventDispatch:
    """The event hook (python-socketio's ``_handle_event_internal``) and its answers."""

    engine: Engine
    observer: Observer
    error_event: str
    outgoing: Outgoing
    _states: dict[str, ConnectionState]
    _events_received: int
    _trigger: Callable[..., Awaitable[Any]]
    _installed_trigger: Callable[..., Awaitable[Any]]
    _event_original: Callable[..., Awaitable[Any]]
    _not_handled: Any

    async def _on_event(  # noqa: PLR0915, PLR0917 (its signature; one frame per event)
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
            "size_bytes": INBOUND_SIZE.get(),
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
            if await self._policy_fault(exc, server, state, event, ack):
                return
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
            if trigger is self._trigger:
                # A coroutine handler is awaited here rather than in python-socketio,
                # which turns a ``CancelledError`` into an empty result: a handler
                # cancelled from within (an inner timeout) failed, and its client and its
                # breaker must hear so. Inline: no coroutine frame of ours per event.
                args = data[1:]
                handler, handler_args = server._get_event_handler(data[0], namespace, (sid, *args))
                if handler is not None and _is_coroutine_function(handler):
                    result = await handler(*handler_args)
                else:
                    result = await trigger(data[0], namespace, sid, *args)
            else:
                result = await trigger(data[0], namespace, sid, *data[1:])
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancelled_from_outside():
                raise
            classification, payload, error = self._report_error(exc, Hook.EVENT, state, event)
            await self._answer(server, state, ack, payload, notify=True)
            if guard.permits:  # after the answer: the client never waits for the record
                await self._after_call(guard, state, event, classification, error)
            return
        if ack is not None:
            if result is self._not_handled:
                await self._unhandled(server, state, ack)
            else:
                await server._send_packet(
                    eio_sid,
                    server.packet_class(
                        sio_packet.ACK, namespace=namespace, id=ack, data=ack_values(result)
                    ),
                )
        if guard.permits:
            if engine.state.shared:
                await self._after_call(guard, state, event, None, None)
            else:
                self._succeeded_now(guard, state, event)

    async def _policy_fault(
        self,
        exc: Exception,
        server: Any,
        state: ConnectionState,
        event: Mapping[str, Any],
        ack: Any,
    ) -> bool:
        """A fault of the policy machinery: reported, then answered as the policy says. The
        event goes on unless the operator chose ``fail_closed`` for failures to evaluate;
        True when it was refused."""
        _, payload, _ = self._report_error(exc, Hook.EVENT, state, event)
        if self.engine.policy.defaults.on_eval_error is not EvalFailureMode.FAIL_CLOSED:
            return False
        await self._answer(server, state, ack, payload, notify=True)
        return True

    async def _unhandled(self, server: Any, state: ConnectionState, ack: Any) -> None:
        """An event no handler serves asked for an ack: answered if the policy says so."""
        if self.engine.policy.connections.protocol.answer_unknown_events:
            payload = UNKNOWN_EVENT.payload("connections/protocol")
            await self._answer(server, state, ack, payload, notify=False)

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
        elif (
            verdict.plan.breakers
            and engine.state.shared
            and not engine.state.refused_locally(verdict.rates.enforced, verdict.rates.now)
        ):
            settled = await self._settle_with_permits(verdict, conn, claims, event)
            if not isinstance(settled, Decision):
                return settled
            decision = settled  # to be delayed: its permits are asked for after the delay
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

    async def _settle_with_permits(
        self,
        verdict: PendingEvent,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: dict[str, Any],
    ) -> tuple[Decision, BreakerGuard, float] | Decision:
        """The shared store's rate-limit answers and the breakers' permits asked at once:
        in one script where the engine can (:meth:`Engine.settle_with_permits`), else as
        two calls in one pipeline (one round trip) instead of two in a row.

        A permit taken for an event the limits then refuse is handed back. The bare
        decision of an event to be delayed: its permits are asked for after the delay, as
        always.
        """
        engine = self.engine
        together = await engine.settle_with_permits(verdict, conn, claims, event)
        if together is not None:  # one call to the store for both
            decision, permits = together
            outcome = decision.outcome
            if outcome is not _ALLOW:
                return decision if outcome is _DELAY else (decision, NO_GUARD, 0.0)
            if isinstance(permits, BreakerGuard):
                return decision, permits, 0.0
            return permits, NO_GUARD, 0.0
        asking = asyncio.ensure_future(engine.before_call(conn, claims, event))
        try:
            decision = await engine.settle_event(verdict)
        except BaseException:
            await _give_back(engine, asking)
            raise
        outcome = decision.outcome
        if outcome is not _ALLOW:
            await _give_back(engine, asking)
            return decision if outcome is _DELAY else (decision, NO_GUARD, 0.0)
        permits = await asking
        if isinstance(permits, BreakerGuard):
            return decision, permits, 0.0
        return permits, NO_GUARD, 0.0

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

    def _succeeded_now(
        self, guard: BreakerGuard, state: ConnectionState, event: Mapping[str, Any]
    ) -> None:
        """:meth:`_after_call` for a success, when the state is this process's: no
        coroutine of ours per event."""
        try:
            transitions = self.engine.after_call_now(guard, state.conn, event, None, None)
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


def ack_values(result: Any) -> list[Any]:
    """A handler's return value as ack arguments, as python-socketio sends them."""
    if result is None:
        return []
    if isinstance(result, tuple):
        return list(result)
    return [result]


def _cancelled_from_outside() -> bool:
    """Whether the task running the handler is itself being cancelled (a shutdown): then
    the cancellation is not the handler's failure and must go on."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _give_back(engine: Engine, asking: asyncio.Future[BreakerGuard | Decision]) -> None:
    """Hand back the permits of a call that will not run (its event was refused)."""
    try:
        permits = await asking
    except Exception:  # the store failed: there is nothing held to give back
        return
    if isinstance(permits, BreakerGuard):
        await engine.release_permits(permits)
