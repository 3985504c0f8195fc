"""Where a provider reads its token from, and where else a token turned up.

A provider names its places (an ``auth`` payload field, a query parameter, a cookie, a
header with a prefix such as ``Bearer ``), tried in order; the first that holds a token
wins. A token anywhere else is never used: a token in the query string when the policy
says header is how tokens end up in access logs and browser history, and accepting it
would teach clients to keep doing so. :func:`unexpected_tokens` names those other places
(never their values) so the refusal or the log can say where the token was.

A value longer than the cap is refused before it is parsed at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from policy_engine.auth.failures import AuthenticationConfigError, AuthenticationError, AuthReason
from policy_engine.auth.handshake import Handshake

DEFAULT_MAX_TOKEN_BYTES = 8192
TOKEN_NAMES = frozenset(
    {"token", "access_token", "id_token", "jwt", "auth_token", "authorization", "bearer"}
)
_JWT_SHAPE = re.compile(r"(?:bearer\s+)?eyJ[\w-]*\.[\w-]*\.[\w-]*", re.IGNORECASE)


class TokenPlace(StrEnum):
    AUTH = "auth"
    QUERY = "query"
    COOKIE = "cookie"
    HEADER = "header"


@dataclass(frozen=True, slots=True)
class TokenLocation:
    """One place a token may be read from; ``prefix`` (headers only) is matched ignoring case."""

    place: TokenPlace
    name: str
    prefix: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise AuthenticationConfigError(f"a {self.place.value} token location needs a name")
        if self.prefix and self.place is not TokenPlace.HEADER:
            raise AuthenticationConfigError("only a header token location has a prefix")
        if self.place is TokenPlace.HEADER:
            object.__setattr__(self, "name", self.name.lower())

    def __str__(self) -> str:
        return f"{self.place.value}:{self.name}"


BEARER_HEADER = TokenLocation(TokenPlace.HEADER, "authorization", "Bearer ")


@dataclass(frozen=True, slots=True)
class TokenSourceSpec:
    """The places one provider reads, in order."""

    locations: tuple[TokenLocation, ...] = (BEARER_HEADER,)

    def __post_init__(self) -> None:
        if not self.locations:
            raise AuthenticationConfigError("a token source needs at least one location")


@dataclass(frozen=True, slots=True)
class TokenExtraction:
    """The token found (``""`` when none) and the named place it came from."""

    token: str = field(default="", repr=False)
    location: TokenLocation | None = None


def extract_token(
    spec: TokenSourceSpec, handshake: Handshake, max_bytes: int = DEFAULT_MAX_TOKEN_BYTES
) -> TokenExtraction:
    """The first token in the spec's places; refused if oversize or not text, unparsed."""
    for location in spec.locations:
        raw = _read(location, handshake)
        if raw is None:
            continue
        if not isinstance(raw, str):
            raise AuthenticationError(AuthReason.MALFORMED, f"{location} is not text")
        if len(raw) > max_bytes + len(location.prefix):
            raise AuthenticationError(AuthReason.TOO_LARGE, f"{location} over {max_bytes} bytes")
        token = _strip_prefix(raw, location.prefix)
        if token:
            return TokenExtraction(token, location)
    return TokenExtraction()


def unexpected_tokens(handshake: Handshake, named: Iterable[TokenLocation]) -> tuple[str, ...]:
    """The places outside ``named`` holding what looks like a token, e.g. ``("query:token",)``.

    "Looks like": a well-known name (``token``, ``access_token``, ``Authorization``...) with
    a value, or any value shaped like a compact JWT.
    """
    known = {(location.place, location.name) for location in named}
    found: list[str] = []
    for place, values in (
        (TokenPlace.AUTH, handshake.auth),
        (TokenPlace.QUERY, handshake.query),
        (TokenPlace.COOKIE, handshake.cookies),
        (TokenPlace.HEADER, handshake.headers),
    ):
        found.extend(
            f"{place.value}:{name}"
            for name, value in values.items()
            if (place, name) not in known and _looks_like_token(name, value)
        )
    return tuple(sorted(found))


def _read(location: TokenLocation, handshake: Handshake) -> object | None:
    source: Mapping[str, object] = {
        TokenPlace.AUTH: handshake.auth,
        TokenPlace.QUERY: handshake.query,
        TokenPlace.COOKIE: handshake.cookies,
        TokenPlace.HEADER: handshake.headers,
    }[location.place]
    return source.get(location.name)


def _strip_prefix(raw: str, prefix: str) -> str:
    if not prefix:
        return raw.strip()
    if raw[: len(prefix)].lower() != prefix.lower():
        return ""
    return raw[len(prefix) :].strip()


def _looks_like_token(name: str, value: object) -> bool:
    if not isinstance(value, str) or not value:
        return False
    return name.lower() in TOKEN_NAMES or _JWT_SHAPE.fullmatch(value) is not None
