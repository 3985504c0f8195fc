"""JWT verification in the spirit of Envoy's ``jwt_authn``: one frozen spec, one verifier.

:func:`verify_token` is the whole check, pure and synchronous: size, header, algorithm
allow-list, key choice by ``kid`` and algorithm, signature (PyJWT), then the claims
against ``now``. :class:`JwtVerifier` is its async shell for the server: it takes keys
from a :class:`KeySource` and, when a token names a ``kid`` no key has, asks the source
for one refresh and tries once more. Everything cheap (size, shape, algorithm, an issuer
that cannot match) is refused before any key is fetched, so a stream of garbage tokens
cannot drive the key endpoint.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt

from policy_engine.auth.claims import check_claims
from policy_engine.auth.failures import AuthenticationConfigError, AuthenticationError, AuthReason
from policy_engine.auth.keys import KeySet, KeySource, VerificationKey, check_algorithms
from policy_engine.auth.token_source import DEFAULT_MAX_TOKEN_BYTES

DEFAULT_LEEWAY = 30.0

Clock = Callable[[], float]

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*={0,2}")
_SIGNATURES = jwt.PyJWS(options={"verify_signature": True, "enforce_minimum_key_length": True})


@dataclass(frozen=True, slots=True)
class JwtVerifierSpec:
    """One provider's rules for a token (what ``authentication.providers.<name>`` compiles to).

    ``issuer`` empty or ``audiences`` empty leave that claim unchecked, as in Envoy; a token
    without ``exp`` is refused unless ``required_claims`` is set without it.
    """

    name: str
    algorithms: tuple[str, ...]
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    leeway: float = DEFAULT_LEEWAY
    required_claims: tuple[str, ...] = ("exp",)
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES

    def __post_init__(self) -> None:
        check_algorithms(self.algorithms)
        if not self.leeway >= 0:
            raise AuthenticationConfigError(f"{self.name}: leeway must be zero or more seconds")
        if self.max_token_bytes <= 0:
            raise AuthenticationConfigError(f"{self.name}: max_token_bytes must be positive")


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The claims of a token whose signature and claims were checked, and by what."""

    provider: str
    claims: Mapping[str, Any] = field(repr=False)
    algorithm: str
    key_id: str | None


def verify_token(token: str, spec: JwtVerifierSpec, keys: KeySet, now: float) -> VerifiedToken:
    """The verified claims of ``token``, or :class:`AuthenticationError` saying which check failed.

    ``unknown_kid`` means only that ``keys`` has no key named by the token: the async
    verifier refreshes on it; a caller without a remote source treats it as final.
    """
    header = _header(token, spec.max_token_bytes)
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in spec.algorithms:
        raise AuthenticationError(AuthReason.ALGORITHM_NOT_ALLOWED, f"provider {spec.name!r}")
    if "crit" in header:
        raise AuthenticationError(
            AuthReason.MALFORMED, "critical header extensions are not supported"
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthenticationError(AuthReason.MALFORMED, "kid is not a string")
    if not keys.knows(kid):
        raise AuthenticationError(AuthReason.UNKNOWN_KID, f"provider {spec.name!r}")
    candidates = keys.candidates(kid, algorithm)
    if not candidates:
        raise AuthenticationError(AuthReason.ALGORITHM_NOT_ALLOWED, f"no {algorithm} key")
    payload = _signed_payload(token, candidates, algorithm)
    claims = _claims(payload)
    check_claims(
        claims,
        now=now,
        leeway=spec.leeway,
        issuer=spec.issuer,
        audiences=spec.audiences,
        required=spec.required_claims,
    )
    return VerifiedToken(
        provider=spec.name,
        claims=MappingProxyType(claims),
        algorithm=algorithm,
        key_id=kid,
    )


def unverified_issuer(token: str) -> str:
    """The ``iss`` a token claims, unchecked: only for choosing whether to fetch keys."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else ""


class JwtVerifier:
    """The server's verifier: ``await verifier.verify(token)``; keys from a :class:`KeySource`.

    ``clock`` gives wall-clock seconds for ``exp``/``nbf``/``iat``; tests inject it.
    """

    def __init__(self, spec: JwtVerifierSpec, keys: KeySource, clock: Clock = time.time) -> None:
        self.spec = spec
        self.keys = keys
        self._clock = clock

    @property
    def name(self) -> str:
        return self.spec.name

    async def verify(self, token: str) -> VerifiedToken:
        keys = await self.keys.current()
        try:
            return verify_token(token, self.spec, keys, self._clock())
        except AuthenticationError as error:
            if error.reason is not AuthReason.UNKNOWN_KID:
                raise
        if self.spec.issuer and unverified_issuer(token) != self.spec.issuer:
            raise AuthenticationError(AuthReason.WRONG_ISSUER)
        keys = await self.keys.refresh_for_unknown_kid()
        return verify_token(token, self.spec, keys, self._clock())


def _header(token: str, max_bytes: int) -> Mapping[str, Any]:
    """The header, read only to choose a key; PyJWT parses the whole token again, strictly,
    when it checks the signature (one parse here instead of its per-character one)."""
    if len(token) > max_bytes:
        raise AuthenticationError(AuthReason.TOO_LARGE, f"over {max_bytes} bytes")
    if _COMPACT_JWS.fullmatch(token) is None:
        raise AuthenticationError(AuthReason.MALFORMED, "not a compact JWS")
    segment = token[: token.index(".")]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        raise AuthenticationError(AuthReason.MALFORMED, "unreadable header") from None
    if not isinstance(header, dict):
        raise AuthenticationError(AuthReason.MALFORMED, "header is not a JSON object")
    return header


def _signed_payload(token: str, candidates: tuple[VerificationKey, ...], algorithm: str) -> bytes:
    for key in candidates:
        try:
            decoded = _SIGNATURES.decode_complete(token, key.material, algorithms=[algorithm])
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError:
            raise AuthenticationError(AuthReason.MALFORMED, "undecodable token") from None
        payload: bytes = decoded["payload"]
        return payload
    raise AuthenticationError(AuthReason.BAD_SIGNATURE)


def _claims(payload: bytes) -> dict[str, Any]:
    try:
        claims = json.loads(payload)
    except (ValueError, binascii.Error):
        raise AuthenticationError(AuthReason.MALFORMED, "payload is not JSON") from None
    if not isinstance(claims, dict):
        raise AuthenticationError(AuthReason.MALFORMED, "payload is not a JSON object")
    return claims
