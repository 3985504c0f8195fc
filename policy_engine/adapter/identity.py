"""Who is connecting: the client's address, user, conversation and claims from a handshake.

Under ASGI, Engine.IO sets ``REMOTE_ADDR`` to ``127.0.0.1`` for every client, so the peer
address comes from the ASGI scope. ``X-Forwarded-For`` is believed only when the peer is one
of the policy's ``identity.trusted_proxies``, and then read from the right: each trusted hop
is skipped and the first untrusted address is the client (a client can prepend anything it
likes to the header, but not what the proxies append after it).

Browsers' Socket.IO clients cannot set custom headers, so identifiers are looked for in the
``auth`` payload first, then the query string. A parameter given twice with different
values is refused rather than read one way here and another way by the application.
Claims are what an authenticator vouched for (the policy's ``authentication`` providers
or the application's ``claims_loader``); the user id comes from them alone unless a
policy trusts client-chosen ids for development. Every client-supplied value that can
become a key or a log field is bounded in length, and IPv6 clients are keyed by their
network (``identity.ipv6_prefix``), so a holder of a /64 is one client to per-IP rules.
Secrets (tokens, cookies, keys) are masked in the ``headers`` and ``query`` maps that
rules and logs see.

Nothing here does I/O; the only await is the application's own claims loader.
"""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from policy_engine.language.model import IdentitySpec
from policy_engine.observe.logs import MASK

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ClaimsLoader = Callable[
    [Mapping[str, Any], Any], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None
]

SENSITIVE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
_SENSITIVE_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "session_key")
_LATEST_EVENT_ID = "latest_event_id"
NO_EVENT_ID = -1


class IdentityError(ValueError):
    """A handshake whose identifiers cannot be read safely (too long, ambiguous)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    # Unmasked, for the verifiers alone: the handshake parsed once serves both.
    raw_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    raw_query: Mapping[str, str] = field(default_factory=dict, repr=False)
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
    """The first value of each query parameter (see :func:`repeated_params`)."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        params.setdefault(name, value)
    return params


def repeated_params(query_string: str, names: Iterable[str]) -> list[str]:
    """The ``names`` that appear more than once with different values."""
    wanted = frozenset(names)
    seen: dict[str, str] = {}
    repeated: list[str] = []
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        if name in wanted:
            if name in seen and seen[name] != value and name not in repeated:
                repeated.append(name)
            seen.setdefault(name, value)
    return repeated


def handshake_value(environ: Mapping[str, Any], auth: Any, name: str) -> str:
    """One identifier the way the engine reads it: the ``auth`` payload, then the query.

    For the application's own handlers, so that it and the policy never disagree on which
    conversation a client asked for. A repeated query parameter reads as absent.
    """
    query_string = str(environ.get("QUERY_STRING", ""))
    if repeated_params(query_string, (name,)):
        return ""
    return _first(name, auth if isinstance(auth, Mapping) else {}, query_params(query_string))


def address_key(address: str, ipv6_prefix: int) -> str:
    """The address per-IP rules key on: IPv6 as its network (``2001:db8::/64``)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ipv6_prefix < 128:
            return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))
    return str(ip)


def identify(
    environ: Mapping[str, Any],
    auth: Any,
    spec: IdentitySpec,
    claims: Mapping[str, Any],
) -> Identity:
    """Read one handshake; ``environ`` is Engine.IO's, holding the ASGI scope.

    Raises :class:`IdentityError` for a value over ``spec.max_identifier_length`` or an
    identifier given twice with different values.
    """
    scope: Mapping[str, Any] = environ.get("asgi.scope") or {}
    headers = scope_headers(scope)
    query_string = str(environ.get("QUERY_STRING", ""))
    names = (spec.user_param, spec.conversation_param, spec.token_param, _LATEST_EVENT_ID)
    repeated = repeated_params(query_string, names)
    if repeated:
        raise IdentityError(f"query parameter {repeated[0]!r} given twice")
    query = query_params(query_string)
    sources = (auth if isinstance(auth, Mapping) else {}, query)
    user = _text(claims.get(spec.user_claim))
    if not user and spec.trust_client_user_id:
        user = _first(spec.user_param, *sources)
    token = _first(spec.token_param, *sources) or _bearer(headers.get("authorization", ""))
    conversation = _first(spec.conversation_param, *sources)
    limit = spec.max_identifier_length
    _bound(limit, {"user": user, "conversation": conversation})
    _bound(limit, {name: query[name] for name in names if name in query})
    # Other parameters may hold anything an application put there (a token under a name
    # of its own, a return URL): bounded as headers are.
    _bound(_TOKEN_LENGTH, query)
    # Headers carry what browsers send (a Referer with its query, a long User-Agent): they
    # are bounded as tokens are, so a rule keyed on one cannot store megabytes, and no
    # browser is refused for an ordinary header.
    _bound(_TOKEN_LENGTH, {name: value for name, value in headers.items() if name != "cookie"})
    _bound(limit, _auth_identifiers(sources[0], names))
    return Identity(
        ip=address_key(client_ip(scope, headers, spec.trusted_proxies), spec.ipv6_prefix),
        user_id=user,
        conversation_id=conversation,
        transport="websocket" if scope.get("type") == "websocket" else "polling",
        origin=headers.get("origin", ""),
        user_agent=headers.get("user-agent", ""),
        headers=mask_headers(headers),
        query=mask_query(query, spec.token_param),
        raw_headers=headers,
        raw_query=query,
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


_TOKEN_LENGTH = 8192
"""Tokens, header values and other query values; identifiers have the policy's own bound."""
MAX_NAME_LENGTH = 256
"""A query parameter's or a header's name."""


def _bound(limit: int, values: Mapping[str, str]) -> None:
    for name, value in values.items():
        if len(name) > MAX_NAME_LENGTH:
            raise IdentityError(f"a parameter name is longer than {MAX_NAME_LENGTH} characters")
        cap = _TOKEN_LENGTH if _sensitive(name) or name == "authorization" else limit
        if len(value) > cap:
            raise IdentityError(f"{name!r} is longer than {cap} characters")


def _auth_identifiers(auth: Mapping[str, Any], names: Iterable[str]) -> dict[str, str]:
    return {name: text for name in names if (text := _text(auth.get(name)))}


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
