"""The connection lifecycle: a handshake judged, accepted or refused, and its release.

Every way a connect can fail (the policy, the claims loader, the application's handler,
a fault of the policy machinery) ends in one classified refusal, never in python-socketio's
bare "Unexpected connection error": a ``connect_error``, or, for what retrying can fix, the
session closed after its advice so a plain client reconnects (see ``admission``). A connect
refused by a connect rate limit or a ceiling may first wait in the admission queue. Every
way a connection ends
(refused, disconnected, or its session gone while it was still connecting) releases what
it held exactly once. These are
:class:`~policy_engine.adapter.attach.PolicyAdapter`'s methods, kept in their own module;
being inherited, they cost no extra call per packet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import socketio

from policy_engine.adapter.admission import admit, advice_packet, retried_by_transport
from policy_engine.adapter.authentication import ConnectAuthentication
from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.identity import ClaimsLoader, Identity, IdentityError, identify
from policy_engine.adapter.outgoing import Outgoing, replayed_up_to
from policy_engine.adapter.recovery import Recovery
from policy_engine.core.admission import AdmissionQueue
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import Engine, conn_context
from policy_engine.core.payload import INVALID_REQUEST, ClientPayload
from policy_engine.language.contexts import Hook
from policy_engine.observe.observer import Observer

_NO_CLAIMS: Mapping[str, Any] = {}


# The adapter's one logger, whichever of its modules reports.
_log = logging.getLogger("policy_engine.adapter.attach")


class ConnectionHooks:
    """The connect and disconnect hooks, over the adapter's table of connections."""

    sio: Any
    engine: Engine
    observer: Observer
    claims_loader: ClaimsLoader | None
    authentication: ConnectAuthentication
    outgoing: Outgoing
    recovery: Recovery
    admission: AdmissionQueue
    _states: dict[str, ConnectionState]
    _trigger: Callable[..., Awaitable[Any]]
    _report_error: Callable[
        [BaseException, Hook, ConnectionState, Mapping[str, Any] | None],
        tuple[Classification, ClientPayload, dict[str, Any]],
    ]

    async def _on_trigger(self, event: str, namespace: str, *args: Any) -> Any:
        if event == "connect" and args and args[0] not in self._states:
            try:
                return await self._connect(namespace, args)
            except socketio.exceptions.ConnectionRefusedError:
                raise
            except Exception as exc:
                # Anything else would leave the client waiting for "Unexpected connection
                # error": even a fault of the policy machinery ends in a classified refusal.
                raise await self._connect_fault(exc) from None
        if (
            event == "disconnect"
            and args
            and args[0] in self._states
            and not self.sio.manager.is_connected(args[0], namespace)
        ):
            # Only python-socketio's own disconnect (the sid is leaving): an event a client
            # named "disconnect", reaching here through the admin UI, releases nothing.
            return await self._disconnect(namespace, args)
        return await self._trigger(event, namespace, *args)

    # -- connect -----------------------------------------------------------------------------

    async def _connect(self, namespace: str, args: tuple[Any, ...]) -> Any:
        engine = self.engine
        sid, environ = args[0], args[1]
        auth = args[2] if len(args) > 2 else None
        policy = engine.policy
        try:
            identity = identify(environ, auth, policy.identity, _NO_CLAIMS)
        except IdentityError as exc:
            raise self._invalid_handshake(exc) from None
        claims_error: Exception | None = None
        try:
            claims, verified_user = await self.authentication.authenticate(
                policy, namespace, environ, auth, identity
            )
        except Exception as exc:
            # Judged after the policy: a throttled client must hear AUTH_THROTTLED.
            claims, verified_user, claims_error = {}, "", exc
        conn = handshake_conn(sid, namespace, identity, verified_user)
        started = time.perf_counter()
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        try:
            decision = await engine.on_connect(conn, claims)
            if not decision.allowed:
                decision = await admit(
                    self.admission,
                    policy,
                    decision,
                    {"conn": conn, "claims": claims, "load": engine.load},
                    lambda: engine.on_connect(conn, claims),
                    eio_sid,
                    lambda: self._eio_open(eio_sid),
                )
        except BaseException:
            await self._forget(conn)
            raise
        self.observer.decision("connect", decision, time.perf_counter() - started, conn)
        if not decision.allowed:
            await self._forget(conn)
            if retried_by_transport(decision):
                await self._close_transport(eio_sid, decision.payload or {})
            raise refusal(decision.payload)
        now = time.monotonic()
        state = ConnectionState(sid, namespace, eio_sid, conn, claims, now, now)
        # Tracked from the moment it is counted, so a session that ends from here on,
        # whichever way, finds it to release.
        self._track(state)
        try:
            if decision.outcome is Outcome.DELAY:
                await asyncio.sleep(decision.delay)
            if not self._session_open(state):
                raise await self._abandoned(state, handler_ran=False)
            result = await self._accept_and_recover(
                state, args, claims_error, verified_user, identity.latest_event_id
            )
            if not self._session_open(state):
                raise await self._abandoned(state, handler_ran=True)
        except socketio.exceptions.ConnectionRefusedError:
            await self._untrack(state)
            raise
        except Exception as exc:
            raise await self._connect_fault(exc, state) from None
        except BaseException:
            await self._untrack(state)
            raise
        self.observer.connection("opened", conn)
        return result

    async def _accept_and_recover(
        self,
        state: ConnectionState,
        args: tuple[Any, ...],
        claims_error: Exception | None,
        verified_user: str,
        latest: int,
    ) -> Any:
        """The application's handler, then the replay of what a returning client missed."""
        conn, sid, namespace = state.conn, state.sid, state.namespace
        recovering = (
            latest >= 0 and self.engine.policy.recovery.enabled and bool(conn["conversation_id"])
        )
        link = self.outgoing.links.get(state.eio_sid) if recovering else None
        if link is not None:
            # From here on, live events wait: the replay must reach the client first, even
            # those the application's own connect handler emits.
            link.outbox.hold()
        replayed_to = latest
        try:
            result = await self._accept(state, args, claims_error, bool(verified_user))
            # Only to a socket the application let into the conversation: a client names
            # the conversation it wants, the application decides whether it belongs there.
            if recovering and conn["conversation_id"] in self.sio.rooms(sid, namespace):
                replayed_to = await self.recovery.recover(sid, namespace, conn, latest)
        finally:
            if link is not None:
                link.outbox.release(replayed_up_to(conn["conversation_id"], replayed_to))
        return result

    def _eio_open(self, eio_sid: str) -> bool:
        socket = self.sio.eio.sockets.get(eio_sid)
        return socket is not None and not socket.closing and not socket.closed

    async def _close_transport(self, eio_sid: str, payload: Mapping[str, Any]) -> None:
        """Refuse a connect so that a plain socket.io-client retries it: the advice as an
        event on the advice namespace, then the Engine.IO session ended (the client's
        manager reconnects with its own backoff). python-socketio's ``connect_error`` that
        follows finds no session to go to.

        Over a WebSocket the advice goes out, then the WebSocket closes: socket.io-client
        ignores a close packet there and waits for the socket to close, which
        python-engineio leaves to the client, so the ``None`` its writer takes as the end
        closes it now. A long-polling session is ended at once: a poll already waiting
        carries the advice, the next request finds no session and fails, and the client
        reconnects; the gate then answers its new handshake with the same advice (see
        ``admission``), so nothing waits on a client that may have stopped polling.
        """
        eio = self.sio.eio
        socket = eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            return
        await eio.send(eio_sid, advice_packet(payload))
        if socket.upgraded:
            await socket.close(wait=False)
            socket.queue.put_nowait(None)
        else:
            await socket.close(wait=False, abort=True)

    def _session_open(self, state: ConnectionState) -> bool:
        """Whether the connection is still tracked and its Engine.IO session still up."""
        if self._states.get(state.sid) is not state:
            return False  # released already: its session ended while it connected
        socket = self.sio.eio.sockets.get(state.eio_sid)
        return socket is not None and not socket.closing and not socket.closed

    async def _abandoned(self, state: ConnectionState, *, handler_ran: bool) -> Exception:
        """A connect whose session ended before it was accepted: released, never accepted.

        Refused, so python-socketio forgets the sid too (it would otherwise keep it as
        connected for good); an application whose connect handler accepted it hears its
        disconnect, as it would had the session ended a moment later.
        """
        await self._untrack(state)
        if handler_ran and not state.disconnect_heard:
            state.disconnect_heard = True
            reason = self.sio.reason.TRANSPORT_CLOSE
            try:
                await self._trigger("disconnect", state.namespace, state.sid, reason)
            except Exception as exc:
                self._report_error(exc, Hook.DISCONNECT, state, None)
        abandoned: Exception = socketio.exceptions.ConnectionRefusedError()
        return abandoned

    async def _connect_fault(
        self, exc: Exception, state: ConnectionState | None = None
    ) -> Exception:
        _log.error("connect hook failed", exc_info=exc)
        if state is not None:
            await self._untrack(state)
        conn = state.conn if state is not None else None
        classification, payload, error = self.engine.on_error(exc, Hook.CONNECT, conn)
        self.observer.error("connect", classification, error, payload, conn)
        return refusal(payload)

    def _invalid_handshake(self, exc: IdentityError) -> Exception:
        return invalid_handshake(exc, self.observer)

    async def _accept(
        self,
        state: ConnectionState,
        args: tuple[Any, ...],
        failure: BaseException | None,
        verified: bool,
    ) -> Any:
        """Run the application's connect handler; any failure becomes a classified refusal.

        Failed sign-ins are forgotten only by a verified sign-in of the same user: never by
        an anonymous connect, nor for the address (an attacker's own good login between
        guesses must not reset the count of its guesses).
        """
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
        if verified:
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
        payload = refused_by_app(contract, exc)
        self.observer.error("connect", classification, error, payload, conn)
        if engine.counts_as_auth_failure(classification):
            await engine.record_auth_failure(conn)
        return refusal(payload)

    # -- disconnect --------------------------------------------------------------------------

    async def _disconnect(self, namespace: str, args: tuple[Any, ...]) -> Any:
        state = self._states[args[0]]
        state.disconnect_heard = True
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
        """Release everything a connection held, once: whichever path ends it first releases
        it, and any later call finds nothing left. ``closed``: it had been accepted."""
        if self._states.get(state.sid) is not state:
            return
        del self._states[state.sid]
        self.outgoing.untrack(state)
        conversation = state.conn["conversation_id"]
        if conversation:
            self.recovery.index.leave(conversation, time.monotonic())
        await self._forget(state.conn)
        self.admission.released()
        if closed:
            self.observer.connection(
                state.close_event or "closed", state.conn, state.close_reason or reason
            )

    async def _forget(self, conn: Mapping[str, Any]) -> None:
        """Free what the engine keeps for a connection: its count and per-connection caches.

        Safe for a connection never counted (a refused one) and for one already forgotten.
        """
        try:
            await self.engine.on_disconnect(conn)
        except Exception:
            _log.exception("releasing connection %s failed", conn["sid"])

    # -- sessions that end while connecting --------------------------------------------------

    def _watch_sessions(self) -> None:
        """Release connections whose Engine.IO session ends while they are connecting.

        python-socketio runs no disconnect for a sid still in its connect handler (its
        ``_handle_disconnect`` skips a pending sid), so the one hook that sees every session
        end is Engine.IO's own ``disconnect`` handler: wrapped here, it releases whatever the
        original left tracked.
        """
        sio = self.sio
        original = sio._handle_eio_disconnect

        async def session_ended(eio_sid: str, *args: Any) -> Any:
            try:
                return await original(eio_sid, *args)
            finally:
                await self._release_session(eio_sid)

        # The admin UI's own Engine.IO handler calls the server's method: patched on the
        # instance, it is reached whichever handler Engine.IO calls.
        sio._handle_eio_disconnect = session_ended
        if sio.eio.handlers.get("disconnect") == original:
            sio.eio.handlers["disconnect"] = session_ended
        self._connect_aside()

    def _connect_aside(self) -> None:
        """Under an admission queue, judge each namespace connect in a task of its own.

        python-socketio awaits a connect in the Engine.IO message handler, so while a
        connect waits its turn, nothing more is read from its session: a client that leaves
        would be noticed only when the wait ends. Aside, the session's close is read at
        once, and the wait gives its place up (see ``_release_session``). A client sends
        nothing more to a namespace before its connect is answered.
        """
        sio = self.sio
        original = sio._handle_connect
        running: set[asyncio.Task[Any]] = set()

        async def handle_connect(eio_sid: str, namespace: str | None, data: Any) -> None:
            if self.engine.policy.connections.queue.max_wait <= 0:
                await original(eio_sid, namespace, data)
                return
            task = asyncio.ensure_future(original(eio_sid, namespace, data))
            running.add(task)
            task.add_done_callback(settled)

        def settled(task: asyncio.Task[Any]) -> None:
            running.discard(task)
            if not task.cancelled() and task.exception() is not None:
                _log.error("connect failed", exc_info=task.exception())

        sio._handle_connect = handle_connect

    async def release_all(self) -> None:
        """Release every connection still tracked: the server is stopping.

        Long-polling sessions outlive their HTTP requests, so no disconnect may ever come
        for them; on a shared store their counts would outlive this process.
        """
        for state in list(self._states.values()):
            await self._untrack(state, "server shutdown", closed=True)

    async def _release_session(self, eio_sid: str) -> None:
        self.admission.abandon(eio_sid)
        manager = self.sio.manager
        for namespace in list(manager.get_namespaces()):
            sid = manager.sid_from_eio_sid(eio_sid, namespace)
            state = self._states.get(sid) if sid is not None else None
            if state is not None and state.eio_sid == eio_sid:
                await self._untrack(state)


def handshake_conn(
    sid: str, namespace: str, identity: Identity, verified_user: str
) -> dict[str, Any]:
    """The ``conn`` context of a handshake: a verified user id wins over a client's own."""
    return conn_context(
        sid=sid,
        namespace=namespace,
        ip=identity.ip,
        user_id=verified_user or identity.user_id,
        conversation_id=identity.conversation_id,
        transport=identity.transport,
        origin=identity.origin,
        user_agent=identity.user_agent,
        headers=dict(identity.headers),
        query=dict(identity.query),
    )


def invalid_handshake(exc: IdentityError, observer: Observer) -> Exception:
    """A handshake whose identifiers cannot be trusted: refused before any work."""
    payload = INVALID_REQUEST.payload("identity", detail=exc.reason)
    decision = Decision(Outcome.REJECT, "identity", payload)
    observer.decision("connect", decision, 0.0, None)
    return refusal(payload)


def refused_by_app(contract: ClientPayload, exc: BaseException) -> dict[str, Any]:
    """A failed connect handler's client payload: an explicit refusal (python-socketio's
    ``ConnectionRefusedError`` with arguments) keeps the message written for the client."""
    payload: dict[str, Any] = dict(contract)
    app_refusal = getattr(exc, "error_args", None)
    if isinstance(app_refusal, Mapping):
        payload = {**payload, "message": str(app_refusal.get("message", payload["message"]))}
        if "data" in app_refusal:
            payload["data"] = app_refusal["data"]
    return payload


def refusal(payload: Mapping[str, Any] | None) -> Exception:
    """What python-socketio turns into ``connect_error`` ``{'message': ..., 'data': ...}``."""
    data = dict(payload or {})
    refused: Exception = socketio.exceptions.ConnectionRefusedError(
        str(data.get("message", "Connection refused.")), data
    )
    return refused
