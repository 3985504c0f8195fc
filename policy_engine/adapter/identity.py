"""Who is connecting: the client's address, user, conversation and claims from a handshake.

Under ASGI, Engine.IO sets ``REMOTE_ADDR`` to ``127.0.0.1`` for every client, so the peer
address comes from the ASGI scope. ``X-Forwarded-For`` is believed only when the peer is one
of the policy's ``identity.trusted_proxies``, and then read from the right: each trusted hop
is skipped and the first untrusted address is the client (a client can prepend anything it
likes to the header, but not what the proxies append after it).

Browsers' Socket.IO clients cannot set custom headers, so identifiers are looked for in the
``auth`` payload first, then the query string, then headers. Claims are what an
authenticator vouched for: only the application's ``claims_loader`` provides them. Without
one, a connection has no claims: a client cannot grant itself a role by sending some.
:func:`client_claims` is a loader that does trust the auth payload's ``claims``, for
development and tests, and has to be passed on purpose. Secrets (tokens, cookies, keys) are
masked in the ``headers`` and ``query`` maps that rules and logs see.

Nothing here does I/O; the only await is the application's own claims loader.
"""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from policy_engine.language.model import IdentitySpec
from policy_engine.observe.logs import MASK

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ClaimsLoader = Callable[
    [Mapping[str, Any], Any], Mapping[str, Any] | Awaitable[Mapping[str, Any]] | None
]

SENSITIVE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
_SENSITIVE_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "session_key")
_LATEST_EVENT_ID = "latest_event_id"
NO_EVENT_ID = -1


@dataclass(frozen=True, slots=True)
class Identity:
    """Everything the ``conn`` context needs from a handshake, plus what rules never see."""

    ip: str
    user_id: str = ""
    conversation_id: str = ""
    transport: str = ""
    origin: str = ""
    user_agent: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    token: str = field(default="", repr=False)
    latest_event_id: int = NO_EVENT_ID


@lru_cache(maxsize=32)
def trusted_networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """The compiled form of ``identity.trusted_proxies`` (cached: policies reuse the tuple)."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def peer_ip(scope: Mapping[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def client_ip(
    scope: Mapping[str, Any], headers: Mapping[str, str], trusted: tuple[str, ...]
) -> str:
    """The client's address: the peer, or what trusted proxies say they forwarded for."""
    peer = peer_ip(scope)
    forwarded = headers.get("x-forwarded-for")
    if not forwarded or not trusted:
        return peer
    networks = trusted_networks(trusted)
    if not _within(peer, networks):
        return peer
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_address(hop):
            # A malformed entry was not written by a proxy we trust: stop believing here.
            return peer
        if not _within(hop, networks):
            return hop
    return hops[0] if hops else peer


def scope_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """Request headers, names lower-cased, repeated headers joined with ``", "``."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def query_params(query_string: str) -> dict[str, str]:
    """The last value of each query parameter."""
    return dict(parse_qsl(query_string, keep_blank_values=True))


def identify(
    environ: Mapping[str, Any],
    auth: Any,
    spec: IdentitySpec,
    claims: Mapping[str, Any],
) -> Identity:
    """Read one handshake; ``environ`` is Engine.IO's, holding the ASGI scope."""
    scope: Mapping[str, Any] = environ.get("asgi.scope") or {}
    headers = scope_headers(scope)
    query = query_params(str(environ.get("QUERY_STRING", "")))
    sources = (auth if isinstance(auth, Mapping) else {}, query)
    user = _text(claims.get(spec.user_claim)) or _first(spec.user_param, *sources)
    token = _first(spec.token_param, *sources) or _bearer(headers.get("authorization", ""))
    return Identity(
        ip=client_ip(scope, headers, spec.trusted_proxies),
        user_id=user,
        conversation_id=_first(spec.conversation_param, *sources),
        transport="websocket" if scope.get("type") == "websocket" else "polling",
        origin=headers.get("origin", ""),
        user_agent=headers.get("user-agent", ""),
        headers=mask_headers(headers),
        query=mask_query(query, spec.token_param),
        token=token,
        latest_event_id=_event_id(_first(_LATEST_EVENT_ID, *sources)),
    )


async def load_claims(
    environ: Mapping[str, Any], auth: Any, loader: ClaimsLoader | None
) -> dict[str, Any]:
    """The claims for one handshake; the loader's exceptions propagate to be classified."""
    if loader is not None:
        loaded = loader(environ, auth)
        if inspect.isawaitable(loaded):
            loaded = await loaded
        return dict(loaded) if isinstance(loaded, Mapping) else {}
    return {}


def client_claims(_environ: Mapping[str, Any], auth: Any) -> dict[str, Any]:
    """A loader that believes the ``claims`` the client sends in its auth payload.

    For development and tests only: any client can claim anything this way.
    """
    claims = auth.get("claims") if isinstance(auth, Mapping) else None
    return dict(claims) if isinstance(claims, Mapping) else {}


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: MASK if name in SENSITIVE_HEADERS or _sensitive(name) else value
        for name, value in headers.items()
    }


def mask_query(query: Mapping[str, str], token_param: str) -> dict[str, str]:
    return {
        name: MASK if name == token_param or _sensitive(name) else value
        for name, value in query.items()
    }


def _sensitive(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return any(word in lowered for word in _SENSITIVE_WORDS)


def _first(name: str, *sources: Mapping[str, Any]) -> str:
    for source in sources:
        value = _text(source.get(name))
        if value:
            return value
    return ""


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _bearer(authorization: str) -> str:
    scheme, _, credentials = authorization.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def _event_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        return NO_EVENT_ID
    return value if value >= 0 else NO_EVENT_ID


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _within(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)
