"""The parts of a Socket.IO handshake a credential can travel in, in one plain value.

The adapter already parses the ASGI scope (headers, query string) and the client's
``auth`` payload; it hands them here as mappings, so nothing in this package knows ASGI,
Engine.IO or python-socketio. Header names are lower-cased on the way in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_HTTP_PREFIX = "HTTP_"


@dataclass(frozen=True, slots=True)
class Handshake:
    """Headers (lower-case names), query parameters, the ``auth`` payload and the cookies."""

    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    auth: Mapping[str, Any] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if any(name != name.lower() for name in self.headers):
            lowered = {name.lower(): value for name, value in self.headers.items()}
            object.__setattr__(self, "headers", lowered)
        if not isinstance(self.auth, Mapping):
            object.__setattr__(self, "auth", {})
        object.__setattr__(self, "cookies", parse_cookies(self.headers.get("cookie", "")))

    @classmethod
    def from_wsgi_environ(
        cls, environ: Mapping[str, Any], query: Mapping[str, str], auth: Any = None
    ) -> Handshake:
        """From a WSGI-style environ (``HTTP_AUTHORIZATION`` and friends)."""
        headers = {
            name[len(_HTTP_PREFIX) :].replace("_", "-").lower(): str(value)
            for name, value in environ.items()
            if name.startswith(_HTTP_PREFIX)
        }
        return cls(headers=headers, query=query, auth=auth if isinstance(auth, Mapping) else {})


def parse_cookies(header: str) -> dict[str, str]:
    """``a=1; b="2"`` -> ``{"a": "1", "b": "2"}``; the first of a repeated name wins.

    Lenient where ``http.cookies`` is strict: one malformed pair is skipped, not the header.
    """
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name or name in cookies:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies[name] = value
    return cookies
