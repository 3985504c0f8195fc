"""The overload gate: refuse new Socket.IO sessions at the HTTP handshake, before any work.

Once a Socket.IO session exists, refusing it costs a handshake, a connect packet and a
handler call; under overload that is work the server cannot afford. This ASGI middleware
answers new handshakes (requests to the Socket.IO path without a ``sid``) itself while a
connect-hook shedding rule of the policy holds, with ``503``, a ``Retry-After`` header and
the client payload as a JSON body. Requests of existing sessions pass: shedding them would
break connections that are already paid for.

The gate knows nothing of the connecting client yet, so it judges only the rules whose
condition reads ``load`` alone; one whose evaluation fails applies as its ``on_eval_error``
says (by default it applies: a shedding rule fails safe). A rule that also reads ``conn``
or ``claims`` cannot be decided here and is left to the connect hook, which sees the full
context and applies the same failure mode. Shadow-mode rules are left to the connect hook
too, which reports them.

The refusal carries the CORS headers Engine.IO would have added (see ``cors``), so a
browser client on another origin can read the advice; CORS preflights pass to Engine.IO.

WebSocket handshakes pass as well: a browser (or any WebSocket-only client) cannot read the
status or body of a refused upgrade, so its retry advice must come in the ``connect_error``
data, which the connect hook's shedding sends.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
from collections.abc import Callable

from policy_engine.adapter.asgi import ASGIApp, Receive, Scope, Send
from policy_engine.adapter.cors import CorsPolicy
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.engine import Engine
from policy_engine.core.evaluation import matches
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
    ) -> None:
        self.app = app
        self.engine = engine
        self.observer: Observer = observer or NullObserver()
        self.status = status
        self.cors = cors or CorsPolicy()
        self.clock = clock
        path = "/" + socketio_path.strip("/")
        self._prefixes = (path + "/", path)
        self._since: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.is_new_session(scope):
            started = time.perf_counter()
            decision = self.judge()
            if decision is not None:
                self.observer.decision("connect", decision, time.perf_counter() - started, None)
                await self._refuse(scope, send, decision)
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

    def judge(self) -> Decision | None:
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

    async def _refuse(self, scope: Scope, send: Send, decision: Decision) -> None:
        payload = dict(decision.payload or {})
        body = json.dumps(payload, separators=(",", ":")).encode()
        retry_after_ms = payload.get("retry_after_ms") or 0
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, math.ceil(retry_after_ms / 1000))).encode()),
            (b"cache-control", b"no-store"),
            *self.cors.headers(scope),
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
