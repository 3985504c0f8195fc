"""The handshake gate: refuse new Socket.IO sessions at the HTTP handshake, before any work.

Once a Socket.IO session exists, refusing it costs a handshake, a connect packet and a
handler call; under overload that is work the server cannot afford. And a refusal at the
handshake is one a plain socket.io-client retries with its own reconnection backoff (it
never retries a namespace ``connect_error``). This ASGI middleware answers new handshakes
(requests to the Socket.IO path without a ``sid``: the long-polling handshake and a
WebSocket-only client's upgrade) itself, with ``503`` (``429`` for a rate limit), a
``Retry-After`` header and the client payload as a JSON body:

- while a connect-hook shedding rule that reads only ``load`` holds (one whose evaluation
  fails applies as its ``on_eval_error`` says; shadow rules, and rules that read ``conn``
  or ``claims``, are left to the connect hook, which sees the full context);
- while a line of the admission queue (:mod:`policy_engine.core.admission`) this request
  would join stands by its last refusal: a connect rate limit keyed by nothing or by the
  address, ``max_total``, ``max_per_ip``. The namespace connect judged it and consumed
  nothing; the gate only repeats the verdict until its retry time (a ceiling: until a
  connection is released), with the time left.

Requests of existing sessions pass: refusing them would break connections already paid for.
A refused WebSocket upgrade is answered with an HTTP response where the ASGI server offers
the ``websocket.http.response`` extension (uvicorn does), else closed before it is accepted
(403): the client sees a failed transport either way, and retries. The refusal carries the
CORS headers Engine.IO would have added (see ``cors``), so a browser client on another
origin can read the advice; CORS preflights pass to Engine.IO.
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.parse
from collections.abc import Callable

from policy_engine.adapter.asgi import ASGIApp, Receive, Scope, Send
from policy_engine.adapter.cors import CorsPolicy
from policy_engine.adapter.drain import drain_notice
from policy_engine.adapter.identity import address_key, client_ip, scope_headers
from policy_engine.core.admission import AdmissionQueue, retry_after_ms
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import Engine
from policy_engine.core.evaluation import matches
from policy_engine.core.payload import new_correlation_id
from policy_engine.core.shedding import shed_payload
from policy_engine.language.contexts import Hook
from policy_engine.language.model import Mode, ShedAction
from policy_engine.observe.observer import NullObserver, Observer


class HandshakeGate:
    """ASGI middleware in front of ``socketio.ASGIApp``."""

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        *,
        socketio_path: str = "socket.io",
        observer: Observer | None = None,
        status: int = 503,
        clock: Callable[[], float] = time.monotonic,
        cors: CorsPolicy | None = None,
        admission: AdmissionQueue | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.draining = draining
        self._rng = random.Random()  # each refusal's own delay, not a generator each
        self.engine = engine
        self.observer: Observer = observer or NullObserver()
        self.status = status
        self.cors = cors or CorsPolicy()
        self.clock = clock
        self.admission = admission or AdmissionQueue()
        path = "/" + socketio_path.strip("/")
        self._prefixes = (path + "/", path)
        self._since: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in {"http", "websocket"} and self.is_new_session(scope):
            started = time.perf_counter()
            decision = self.judge(scope)
            if decision is not None:
                self.observer.decision("connect", decision, time.perf_counter() - started, None)
                if kind == "http":
                    await self._refuse(scope, send, decision)
                else:
                    await self._refuse_upgrade(scope, receive, send, decision)
                return
        await self.app(scope, receive, send)

    def is_new_session(self, scope: Scope) -> bool:
        """A handshake request; a CORS preflight is left to Engine.IO, which answers it.

        The query is read as Engine.IO reads it (``parse_qs``: percent-decoded names, blank
        values dropped), so ``&sid=`` or ``%73id=x`` cannot make a handshake look like a
        request of an existing session.
        """
        if scope.get("method") == "OPTIONS":
            return False
        path = str(scope.get("path", ""))
        if not (path.startswith(self._prefixes[0]) or path == self._prefixes[1]):
            return False
        query = scope.get("query_string") or b""
        if b"sid" not in query and b"%" not in query:
            return True
        return "sid" not in urllib.parse.parse_qs(query.decode("utf-8", "replace"))

    def judge(self, scope: Scope | None = None) -> Decision | None:
        """The refusal of a new handshake: the server letting its clients go, the load,
        then the admission queue."""
        if self.draining():
            return self._drained()
        return self._shed() or (self._queued(scope) if scope is not None else None)

    def _drained(self) -> Decision:
        """A stopping server takes no new session: come back elsewhere (or here, restarted)."""
        policy = self.engine.policy
        notice = drain_notice(policy, policy.drain, self._rng)
        return Decision(Outcome.REJECT, "drain", notice)

    def _shed(self) -> Decision | None:
        """The refusal a connect-hook shedding rule decides from the load alone, if any."""
        policy = self.engine.policy
        if not policy.shedding:
            return None
        activation = {"load": self.engine.load}
        now = self.clock()
        for rule in policy.shedding:
            if rule.hook is not Hook.CONNECT or rule.action is not ShedAction.REJECT:
                continue
            if rule.mode is Mode.SHADOW or rule.load_gate is not rule.when.program:
                continue  # shadow, or reads more than the load: the connect hook's
            if not matches(rule.when, activation, rule.on_eval_error):
                self._since.pop(rule.name, None)
                continue
            since = self._since.setdefault(rule.name, now)
            if now - since < rule.sustained_for:
                continue
            payload = shed_payload(policy, rule)
            return Decision(Outcome.REJECT, f"shedding/{rule.name}", payload)
        return None

    def _queued(self, scope: Scope) -> Decision | None:
        """A refusal an admission line this handshake would join still stands by."""
        admission = self.admission
        if not admission.has_gate_lines:
            return None
        identity = self.engine.policy.identity
        address = client_ip(scope, scope_headers(scope), identity.trusted_proxies)
        ip = address_key(address, identity.ipv6_prefix)
        standing = admission.gate_refusal(("", f"ip:{ip}"))
        if standing is None:
            return None
        payload, left = standing
        advice = {
            **payload,
            "retry_after_ms": retry_after_ms(left),
            "correlation_id": new_correlation_id(),  # this refusal's own log record
        }
        return Decision(Outcome.REJECT, str(payload.get("policy", "")), advice)

    def status_of(self, decision: Decision) -> int:
        """429 for a rate limit (the client asks too often), else the gate's status."""
        return 429 if (decision.rule or "").startswith("rate_limits/") else self.status

    def response(
        self, scope: Scope, decision: Decision
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """A refusal as an HTTP response, for the WSGI gate: status, body and headers."""
        body, headers = self._headers(scope, decision)
        return self.status_of(decision), body, headers

    def _headers(self, scope: Scope, decision: Decision) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        payload = dict(decision.payload or {})
        body = json.dumps(payload, separators=(",", ":")).encode()
        retry_after = payload.get("retry_after_ms") or 0
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, math.ceil(retry_after / 1000))).encode()),
            (b"cache-control", b"no-store"),
            *self.cors.headers(scope),
        ]
        return body, headers

    async def _refuse_upgrade(
        self, scope: Scope, receive: Receive, send: Send, decision: Decision
    ) -> None:
        """Refuse a WebSocket handshake before accepting it."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # the client went away
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1013})
            return
        body, headers = self._headers(scope, decision)
        status = self.status_of(decision)
        start = {"type": "websocket.http.response.start", "status": status, "headers": headers}
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})

    async def _refuse(self, scope: Scope, send: Send, decision: Decision) -> None:
        body, headers = self._headers(scope, decision)
        status = self.status_of(decision)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
