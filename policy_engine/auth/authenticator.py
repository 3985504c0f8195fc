"""One connect's authentication: the providers in order, a requirement, the user id.

Like Envoy's ``requires_any``: each provider looks for its own credential; the first that
finds one and verifies it decides who is connecting. A credential that is present but
wrong is refused even where anonymous clients are allowed (``allow_missing``): a client
must not escape a refusal by sending a bad token. With no credential at all, a namespace
that ``requires`` one refuses, saying ``unexpected_location`` when a token was sent
somewhere no provider reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol

from policy_engine.auth.failures import AuthenticationError, AuthReason
from policy_engine.auth.handshake import Handshake
from policy_engine.auth.loader import HandshakeClaimsLoader
from policy_engine.auth.token_source import (
    TokenLocation,
    TokenSourceSpec,
    extract_token,
    unexpected_tokens,
)
from policy_engine.auth.verifier import JwtVerifier

_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


class Requirement(StrEnum):
    REQUIRED = "required"
    ALLOW_MISSING = "allow_missing"


class Provider(Protocol):
    """A named way to prove identity; ``None`` from ``authenticate`` means no credential."""

    @property
    def name(self) -> str: ...

    @property
    def locations(self) -> tuple[TokenLocation, ...]: ...

    async def authenticate(self, handshake: Handshake) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class JwtProvider:
    """A JWT verifier and the places its token is read from."""

    verifier: JwtVerifier
    source: TokenSourceSpec = field(default_factory=TokenSourceSpec)

    @property
    def name(self) -> str:
        return self.verifier.name

    @property
    def locations(self) -> tuple[TokenLocation, ...]:
        return self.source.locations

    async def authenticate(self, handshake: Handshake) -> Mapping[str, Any] | None:
        limit = self.verifier.spec.max_token_bytes
        token = extract_token(self.source, handshake, limit).token
        return (await self.verifier.verify(token)).claims if token else None


@dataclass(frozen=True, slots=True)
class LoaderProvider:
    """A claims loader (a session cookie check, the application's own) as a provider."""

    name: str
    loader: HandshakeClaimsLoader
    locations: tuple[TokenLocation, ...] = ()

    async def authenticate(self, handshake: Handshake) -> Mapping[str, Any] | None:
        return await self.loader.load(handshake)


@dataclass(frozen=True, slots=True)
class Authentication:
    """Who connected: verified claims and user id, or anonymous (no provider, no claims)."""

    provider: str = ""
    user_id: str = ""
    claims: Mapping[str, Any] = field(default_factory=lambda: _NO_CLAIMS, repr=False)
    unexpected: tuple[str, ...] = ()

    @property
    def anonymous(self) -> bool:
        return not self.provider


class Authenticator:
    """The providers of one namespace (in order) and the claim that names the user."""

    def __init__(self, providers: Sequence[Provider], user_claim: str = "sub") -> None:
        self.providers = tuple(providers)
        self.user_claim = user_claim
        self._named = tuple(loc for provider in self.providers for loc in provider.locations)

    async def authenticate(
        self, handshake: Handshake, requirement: Requirement = Requirement.REQUIRED
    ) -> Authentication:
        refusal: AuthenticationError | None = None
        for provider in self.providers:
            try:
                claims = await provider.authenticate(handshake)
            except AuthenticationError as error:
                refusal = _more_telling(refusal, error)
                continue
            if claims is not None:
                return Authentication(
                    provider=provider.name,
                    user_id=self._user_id(claims),
                    claims=claims,
                    unexpected=unexpected_tokens(handshake, self._named),
                )
        if refusal is not None:
            raise refusal
        stray = unexpected_tokens(handshake, self._named)
        if requirement is Requirement.REQUIRED:
            if stray:
                raise AuthenticationError(AuthReason.UNEXPECTED_LOCATION, ", ".join(stray))
            raise AuthenticationError(AuthReason.MISSING)
        return Authentication(unexpected=stray)

    def _user_id(self, claims: Mapping[str, Any]) -> str:
        value = claims.get(self.user_claim)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise AuthenticationError(AuthReason.MISSING_CLAIM, f"user claim {self.user_claim!r}")
        return value


def _more_telling(
    kept: AuthenticationError | None, new: AuthenticationError
) -> AuthenticationError:
    """With several providers, a wrong issuer usually means "not this provider's token":
    any other reason says more about why the token was refused."""
    if kept is None or kept.reason is AuthReason.WRONG_ISSUER:
        return new
    return kept
