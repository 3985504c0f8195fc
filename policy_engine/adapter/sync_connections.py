"""The sync server's connect and disconnect hooks: a handshake judged, accepted or refused,
and its release, as :mod:`~policy_engine.adapter.connections` does on the async server.

The same helpers decide (the handshake's identity and ``conn``, the refusal payloads, the
admission queue's advice); the engine is reached through the adapter's
:class:`~policy_engine.adapter.threads.EngineRunner`. Every way a connection ends releases
what it held exactly once, whichever thread sees it end first. These are
:class:`~policy_engine.adapter.sync_server.SyncPolicyAdapter`'s methods, kept in their own
module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import socketio

from policy_engine.adapter.admission import admit, advice_packet, retried_by_transport
from policy_engine.adapter.authentication import ConnectAuthentication
from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.connections import (
    handshake_conn,
    invalid_handshake,
    refusal,
    refused_by_app,
)
from policy_engine.adapter.identity import IdentityError, identify
from policy_engine.adapter.threads import LOOP_TIMEOUT, EngineRunner, run_inline
from policy_engine.adapter.wsgi import handshake_environ
from policy_engine.core.admission import AdmissionQueue
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import Engine
from policy_engine.core.payload import ClientPayload
from policy_engine.language.contexts import Hook
from policy_engine.language.model import PolicySet
from policy_engine.observe.observer import Observer

_log = logging.getLogger("policy_engine.adapter.attach")

T = TypeVar("T")

_NO_CLAIMS: Mapping[str, Any] = {}
_DELAY = Outcome.DELAY
_monotonic = time.monotonic
_perf_counter = time.perf_counter


class SyncConnectionHooks:
    """The connect and disconnect hooks of ``socketio.Server``, over the adapter's table."""

    sio: Any
    engine: Engine
    runner: EngineRunner
    observer: Observer
    authentication: ConnectAuthentication
    admission: AdmissionQueue
    _admission_lock: threading.Lock
    _states: dict[str, ConnectionState]
    _trigger: Callable[..., Any]
    _async_loader: bool
    _eio_disconnect_original: Callable[..., Any]
    _binary_sizes: dict[str, int]
    _report_error: Callable[
        [BaseException, Hook, ConnectionState, Mapping[str, Any] | None],
        tuple[Classification, ClientPayload, dict[str, Any]],
    ]

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

    def _queue_call(self, function: Callable[..., T], *args: Any) -> T:
        """Call the admission queue: on the loop thread while a policy's queue makes
        connects wait there (its lines wake the waiting coroutines), else inline under the
        queue's lock."""
        if self.engine.policy.connections.queue.max_wait > 0:
            return self.runner.call_on_loop(function, *args)
        with self._admission_lock:
            return function(*args)

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
        self._queue_call(self.admission.released)
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
            self._queue_call(self.admission.abandon, eio_sid)
            # Copied in one call first: other threads add and remove connections meanwhile.
            for state in list(self._states.values()):
                if state.eio_sid == eio_sid:
                    self._untrack(state)
