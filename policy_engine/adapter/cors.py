"""The CORS headers Engine.IO would put on a response, for answers given in front of it.

A browser running the Socket.IO client on another origin may read a response only when
it carries ``Access-Control-Allow-Origin`` for that origin. Engine.IO adds the header to
its own responses by its ``cors_allowed_origins`` and ``cors_credentials`` options; a
handshake the overload gate refuses never reaches Engine.IO, so the gate adds the same
headers itself, from the same options, or the client could not read the retry advice in
the body. The rules are Engine.IO's (``None``: the server's own origin only; ``"*"``: any;
a string, a list or a callable; ``[]``: CORS handling off).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

Headers = list[tuple[bytes, bytes]]
AllowedOrigins = str | Sequence[str] | Callable[..., bool] | None


class CorsPolicy:
    """Engine.IO's ``cors_allowed_origins`` and ``cors_credentials``, applied to an ASGI scope."""

    def __init__(self, allowed_origins: AllowedOrigins = None, *, credentials: bool = True) -> None:
        self.allowed_origins = allowed_origins
        self.credentials = credentials

    @classmethod
    def of(cls, eio: Any) -> CorsPolicy:
        """The options an Engine.IO server was created with (both are public attributes)."""
        return cls(
            getattr(eio, "cors_allowed_origins", None),
            credentials=bool(getattr(eio, "cors_credentials", True)),
        )

    def headers(self, scope: MutableMapping[str, Any]) -> Headers:
        allowed = self.allowed_origins
        if isinstance(allowed, Sequence) and not isinstance(allowed, str) and not allowed:
            return []  # CORS handling is off, as in Engine.IO
        request = _headers(scope)
        origin = request.get("origin")
        headers: Headers = []
        if origin is not None and self._allows(origin, scope, request):
            headers += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        if self.credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def _allows(
        self, origin: str, scope: MutableMapping[str, Any], request: Mapping[str, str]
    ) -> bool:
        allowed = self.allowed_origins
        if allowed is None:
            return origin in _own_origins(request)
        if isinstance(allowed, str):
            return allowed in ("*", origin)
        if callable(allowed):
            try:
                return bool(allowed(origin, _environ(scope, request)))
            except TypeError:
                return bool(allowed(origin))
        return "*" in allowed or origin in allowed


def _headers(scope: MutableMapping[str, Any]) -> dict[str, str]:
    """The request's headers by lower-case name, repeated ones joined by commas (as the
    environ Engine.IO's ASGI driver builds has them)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


def _own_origins(request: Mapping[str, str]) -> list[str]:
    """The server's own origin, and the one a proxy in front of it names (as Engine.IO)."""
    host = request.get("host")
    if host is None:
        return []
    # As Engine.IO's ASGI driver sets ``wsgi.url_scheme``: the proxy's word, or http.
    scheme = request.get("x-forwarded-proto", "http")
    origins = [f"{scheme}://{host}"]
    if "x-forwarded-proto" in request or "x-forwarded-host" in request:
        proto = request.get("x-forwarded-proto", scheme).split(",")[0].strip()
        forwarded_host = request.get("x-forwarded-host", host).split(",")[0].strip()
        origins.append(f"{proto}://{forwarded_host}")
    return origins


def _environ(scope: MutableMapping[str, Any], request: Mapping[str, str]) -> dict[str, Any]:
    """The parts of a WSGI-style environ an origin callable usually reads."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.get("method", "GET"),
        "PATH_INFO": scope.get("path", ""),
        "QUERY_STRING": (scope.get("query_string") or b"").decode("latin-1"),
        "wsgi.url_scheme": request.get("x-forwarded-proto", "http"),
        "asgi.scope": scope,
    }
    for name, value in request.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ
