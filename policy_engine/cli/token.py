"""``policy-engine token``: a signed JWT for trying a policy out, from a private key file.

The shipped policy trusts a development key whose private half is in the repository
(``policies/keys/``), so a demo client or a test can prove an identity the way a real
identity provider's token would. Its defaults are that key, its issuer and audience.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt

KEYS = Path(__file__).resolve().parents[2] / "policies" / "keys"
DEV_KEY = KEYS / "dev-signing-key.pem"
"""The development key of a checkout (an installed wheel ships no private key)."""


def default_key() -> Path:
    """The development key to sign with when none is named: the checkout's, else the one
    under ``policies/keys/`` of the current folder (a copy of the shipped policies).

    Raises FileNotFoundError naming both places and ``--key`` when neither exists."""
    local = Path("policies") / "keys" / DEV_KEY.name
    for candidate in (DEV_KEY, local):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no development key at {DEV_KEY} or {local.resolve()}: name one with --key"
    )


DEV_ISSUER = "policy-engine-dev"
DEV_AUDIENCE = "policy-engine-demo"
DEV_KID = "dev-1"


def mint(
    subject: str,
    claims: Mapping[str, Any] | None = None,
    *,
    key: str | Path = DEV_KEY,
    algorithm: str = "ES256",
    kid: str | None = DEV_KID,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
    ttl: float = 3600.0,
    now: float | None = None,
) -> str:
    """A token for ``subject`` with ``claims`` added, valid for ``ttl`` seconds from ``now``."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "exp": issued + int(ttl),
        "jti": uuid.uuid4().hex,
        **(claims or {}),
    }
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, Path(key).read_bytes(), algorithm=algorithm, headers=headers)
