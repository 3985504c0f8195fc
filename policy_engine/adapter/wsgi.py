"""The WSGI side of the sync server: a handshake read as the identity code reads ASGI's,
and the overload gate as WSGI middleware.

Identity and authentication read a handshake from Engine.IO's environ through its ASGI
scope (peer address, raw headers, transport). Under WSGI the same facts are ``REMOTE_ADDR``
and the ``HTTP_*`` keys, so :func:`handshake_environ` gives the environ the scope they
would have had; the rules then see the same ``conn`` on both servers.

:class:`WSGIGate` is :class:`~policy_engine.adapter.gate.HandshakeGate`'s decision (the
server draining, connect shedding from the load alone, the admission lines' standing
refusals) in front of a WSGI application: a new Engine.IO session is refused with
``503`` (``429`` for a rate limit), ``Retry-After`` and the client payload as JSON before
Engine.IO allocates anything. A WebSocket upgrade is refused the same way, as an HTTP
response to the upgrade request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from policy_engine.adapter.gate import HandshakeGate
from policy_engine.adapter.identity import query_params
from policy_engine.core.decision import Decision

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

_SCOPE = "asgi.scope"
_STATUS = {429: "429 Too Many Requests", 503: "503 Service Unavailable"}


def wsgi_scope(environ: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of an ASGI scope the handshake readers use, from a WSGI environ."""
    headers: list[tuple[bytes, bytes]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").lower()
        elif key in {"CONTENT_TYPE", "CONTENT_LENGTH"}:
            name = key.replace("_", "-").lower()
        else:
            continue
        headers.append((name.encode("latin-1"), str(value).encode("latin-1")))
    query = str(environ.get("QUERY_STRING", ""))
    websocket = query_params(query).get("transport") == "websocket" or (
        str(environ.get("HTTP_UPGRADE", "")).lower() == "websocket"
    )
    peer = str(environ.get("REMOTE_ADDR", ""))
    port = str(environ.get("REMOTE_PORT", "0"))
    return {
        "type": "websocket" if websocket else "http",
        "method": str(environ.get("REQUEST_METHOD", "GET")),
        "path": str(environ.get("PATH_INFO", "")),
        "query_string": query.encode("latin-1", "replace"),
        "headers": headers,
        "client": (peer, int(port) if port.isdigit() else 0) if peer else None,
    }


def handshake_environ(environ: Mapping[str, Any]) -> Mapping[str, Any]:
    """``environ`` with the ASGI scope the handshake readers look for (unchanged when it
    has one already: the sync server mounted under an ASGI bridge)."""
    if _SCOPE in environ:
        return environ
    return {**environ, _SCOPE: wsgi_scope(environ)}


class WSGIGate:
    """WSGI middleware in front of ``socketio.WSGIApp`` (or Flask-SocketIO's middleware)."""

    def __init__(
        self,
        app: WSGIApp,
        gate: HandshakeGate,
        judge: Callable[[dict[str, Any]], Decision | None] | None = None,
    ) -> None:
        self.app = app
        self.gate = gate
        # The gate's judgement, or a caller's wrapper that runs it where its state lives.
        self.judge = judge if judge is not None else gate.judge

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        scope = wsgi_scope(environ)
        if self.gate.is_new_session(scope):
            decision = self.judge(scope)
            if decision is not None:
                self.gate.observer.decision("connect", decision, 0.0, None)
                status, body, headers = self.gate.response(scope, decision)
                start_response(
                    _STATUS.get(status, f"{status} Refused"),
                    [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers],
                )
                return [body]
        return self.app(environ, start_response)
