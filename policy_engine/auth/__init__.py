"""Proving who is connecting: JWT providers, key sources, token places, session cookies.

Nothing here knows Socket.IO: the adapter hands a :class:`Handshake` to an
:class:`Authenticator` and gets an :class:`Authentication` back, or an :class:`AuthenticationError`
whose ``code`` (``AUTH_FAILED`` / ``AUTH_EXPIRED``) the client sees and whose ``reason``
the logs do. ``docs/authentication.md`` describes the policy section this is built from.
"""

from policy_engine.auth.authenticator import (
    Authentication,
    Authenticator,
    JwtProvider,
    LoaderProvider,
    Provider,
    Requirement,
)
from policy_engine.auth.failures import (
    AUTH_EXPIRED,
    AUTH_FAILED,
    AuthenticationConfigError,
    AuthenticationError,
    AuthReason,
)
from policy_engine.auth.handshake import Handshake
from policy_engine.auth.keys import (
    KeySet,
    KeySource,
    StaticKeys,
    VerificationKey,
    env_keys,
    jwks_file_keys,
    key_from_jwk,
    key_from_pem,
    key_from_secret,
    keyset_from_jwks,
    pem_file_keys,
)
from policy_engine.auth.loader import HandshakeClaimsLoader, import_claims_loader
from policy_engine.auth.remote import JwksFetch, RemoteJwks
from policy_engine.auth.session import SessionCookieSpec, SessionVerifier
from policy_engine.auth.token_source import (
    BEARER_HEADER,
    TokenExtraction,
    TokenLocation,
    TokenPlace,
    TokenSourceSpec,
    extract_token,
    unexpected_tokens,
)
from policy_engine.auth.verifier import JwtVerifier, JwtVerifierSpec, VerifiedToken, verify_token

__all__ = [
    "AUTH_EXPIRED",
    "AUTH_FAILED",
    "BEARER_HEADER",
    "AuthReason",
    "Authentication",
    "AuthenticationConfigError",
    "AuthenticationError",
    "Authenticator",
    "Handshake",
    "HandshakeClaimsLoader",
    "JwksFetch",
    "JwtProvider",
    "JwtVerifier",
    "JwtVerifierSpec",
    "KeySet",
    "KeySource",
    "LoaderProvider",
    "Provider",
    "RemoteJwks",
    "Requirement",
    "SessionCookieSpec",
    "SessionVerifier",
    "StaticKeys",
    "TokenExtraction",
    "TokenLocation",
    "TokenPlace",
    "TokenSourceSpec",
    "VerificationKey",
    "VerifiedToken",
    "env_keys",
    "extract_token",
    "import_claims_loader",
    "jwks_file_keys",
    "key_from_jwk",
    "key_from_pem",
    "key_from_secret",
    "keyset_from_jwks",
    "pem_file_keys",
    "unexpected_tokens",
    "verify_token",
]
