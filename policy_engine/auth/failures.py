"""Why a credential was refused, as data: a client-facing code and a reason safe to log.

Every refusal carries one of two codes a client acts on: ``AUTH_EXPIRED`` (get a fresh
token, then reconnect) or ``AUTH_FAILED`` (the credential will never be accepted as it
is). The reason names which check failed, for operators' logs and metrics; neither the
code, the reason nor the detail ever contains the token itself.

A token that is not valid *yet* (``nbf`` or ``iat`` in the future beyond the leeway) is
``AUTH_FAILED``: a client cannot fix the issuer's clock by reconnecting, and retrying the
same token in a loop is what a refusal code must not invite. Only ``keys_unavailable``
is the server's fault, so it alone is retryable.
"""

from __future__ import annotations

from enum import StrEnum

from policy_engine.errors import PolicyEngineError

AUTH_FAILED = "AUTH_FAILED"
AUTH_EXPIRED = "AUTH_EXPIRED"


class AuthReason(StrEnum):
    MISSING = "missing"
    UNEXPECTED_LOCATION = "unexpected_location"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"
    INVALID_CLAIM = "invalid_claim"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    KEYS_UNAVAILABLE = "keys_unavailable"


_EXPIRED_REASONS = frozenset({AuthReason.EXPIRED})
_RETRYABLE_REASONS = frozenset({AuthReason.KEYS_UNAVAILABLE})
_MAX_DETAIL = 120


class AuthenticationError(PolicyEngineError):
    """A credential was refused; ``str()`` of it is safe to log.

    ``detail`` is written by this package from fixed words and names (a claim name, a
    provider), cut to a bounded length, never from the token's content.
    """

    def __init__(self, reason: AuthReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail[:_MAX_DETAIL]
        super().__init__(str(self))

    @property
    def code(self) -> str:
        return AUTH_EXPIRED if self.reason in _EXPIRED_REASONS else AUTH_FAILED

    @property
    def retryable(self) -> bool:
        """True only when the server could not check the credential (no keys yet)."""
        return self.reason in _RETRYABLE_REASONS

    def __str__(self) -> str:
        text = f"{self.code}: {self.reason.value}"
        return f"{text} ({self.detail})" if self.detail else text


class AuthenticationConfigError(PolicyEngineError, ValueError):
    """An authentication setting cannot work (a private key, a short secret, ``alg: none``).

    Raised when a verifier or key source is built, so a bad setting stops a start or a
    reload instead of refusing every client later.
    """
