"""The registered-claim checks of a verified token, against a clock the caller passes in.

PyJWT checks only the signature here: its own time checks read the wall clock, and the
engine's tests and replays need ``now`` injected. Each failed check maps to one
:class:`AuthReason`, so a refusal says which check failed without echoing the claim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from policy_engine.auth.failures import AuthenticationError, AuthReason


def check_claims(
    claims: Mapping[str, Any],
    *,
    now: float,
    leeway: float,
    issuer: str,
    audiences: tuple[str, ...],
    required: tuple[str, ...],
) -> None:
    """Raise :class:`AuthenticationError` for the first failed check; an empty issuer or audience
    list means that claim is not checked (as Envoy's ``jwt_authn`` does)."""
    for name in required:
        if name not in claims:
            raise AuthenticationError(AuthReason.MISSING_CLAIM, f"claim {name!r}")
    expiry = _time_claim(claims, "exp")
    if expiry is not None and now >= expiry + leeway:
        raise AuthenticationError(AuthReason.EXPIRED)
    for name in ("nbf", "iat"):
        moment = _time_claim(claims, name)
        if moment is not None and moment > now + leeway:
            raise AuthenticationError(AuthReason.NOT_YET_VALID, f"claim {name!r} is in the future")
    if issuer and claims.get("iss") != issuer:
        raise AuthenticationError(AuthReason.WRONG_ISSUER)
    if audiences and not _audience_matches(claims.get("aud"), audiences):
        raise AuthenticationError(AuthReason.WRONG_AUDIENCE)


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationError(AuthReason.INVALID_CLAIM, f"claim {name!r} is not a NumericDate")
    return float(value)


def _audience_matches(audience: Any, accepted: tuple[str, ...]) -> bool:
    if isinstance(audience, str):
        return audience in accepted
    if isinstance(audience, list):
        return any(isinstance(item, str) and item in accepted for item in audience)
    return False
