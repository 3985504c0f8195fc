"""Signed session cookies: claims an application's web login put in a cookie, checked here.

The cookie is ``itsdangerous``' URL-safe timed serialisation (the format Flask's session
cookie uses): the JSON claims, a timestamp, and an HMAC-SHA256 over both with a secret
only the servers hold. A cookie older than ``max_age`` is ``AUTH_EXPIRED``; one whose
signature does not match any configured secret is ``AUTH_FAILED``. Several secrets may
be given, newest last, so a secret can be rotated without logging everyone out.

:class:`SessionVerifier` is a :class:`~policy_engine.auth.loader.HandshakeClaimsLoader`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from itsdangerous import BadData, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from policy_engine.auth.failures import AuthenticationConfigError, AuthenticationError, AuthReason
from policy_engine.auth.handshake import Handshake
from policy_engine.auth.token_source import TokenLocation, TokenPlace

MIN_SECRET_BYTES = 32
DEFAULT_SALT = "policy-engine.session"


@dataclass(frozen=True, slots=True)
class SessionCookieSpec:
    """Which cookie, how old it may be (seconds), and where the secret is."""

    cookie: str = "session"
    max_age: float = 86400.0
    secret_env: str = "POLICY_ENGINE_SESSION_SECRET"
    salt: str = DEFAULT_SALT
    max_bytes: int = 4096

    def __post_init__(self) -> None:
        if not self.cookie or self.max_age <= 0 or self.max_bytes <= 0:
            raise AuthenticationConfigError(
                "a session cookie needs a name, a positive max_age and size"
            )


class _ClockedSigner(TimestampSigner):
    """itsdangerous' signer reading an injected clock (tests, replays) instead of time.time."""

    def __init__(self, *args: Any, clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


class SessionVerifier:
    """Checks a session cookie and returns its claims; ``sign`` makes one (tests, apps)."""

    def __init__(
        self,
        spec: SessionCookieSpec,
        secrets: Sequence[str | bytes],
        clock: Callable[[], float] = time.time,
    ) -> None:
        keys = [secret.encode() if isinstance(secret, str) else secret for secret in secrets]
        if not keys or any(len(key) < MIN_SECRET_BYTES for key in keys):
            raise AuthenticationConfigError(
                f"session secrets need at least {MIN_SECRET_BYTES} bytes each"
            )
        self.spec = spec
        self.locations = (TokenLocation(TokenPlace.COOKIE, spec.cookie),)
        self._serializer = URLSafeTimedSerializer(
            keys,
            salt=spec.salt,
            signer=_ClockedSigner,
            signer_kwargs={"digest_method": hashlib.sha256, "clock": clock},
        )

    @classmethod
    def from_env(
        cls,
        spec: SessionCookieSpec,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> SessionVerifier:
        """The secret from ``spec.secret_env``; several, newest last, separated by spaces."""
        value = (os.environ if environ is None else environ).get(spec.secret_env, "")
        if not value.strip():
            raise AuthenticationConfigError(f"environment variable {spec.secret_env} is not set")
        return cls(spec, value.split(), clock)

    def verify(self, cookie: str) -> Mapping[str, Any]:
        if len(cookie) > self.spec.max_bytes:
            raise AuthenticationError(
                AuthReason.TOO_LARGE, f"session cookie over {self.spec.max_bytes}"
            )
        try:
            claims = self._serializer.loads(cookie, max_age=int(self.spec.max_age))
        except SignatureExpired:
            raise AuthenticationError(AuthReason.EXPIRED, "session cookie") from None
        except BadData:
            raise AuthenticationError(AuthReason.BAD_SIGNATURE, "session cookie") from None
        if not isinstance(claims, dict):
            raise AuthenticationError(AuthReason.MALFORMED, "session claims are not an object")
        return MappingProxyType(claims)

    async def load(self, handshake: Handshake) -> Mapping[str, Any] | None:
        cookie = handshake.cookies.get(self.spec.cookie)
        return self.verify(cookie) if cookie else None

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A cookie value for ``claims``, signed with the newest secret at the clock's now."""
        return str(self._serializer.dumps(dict(claims)))
