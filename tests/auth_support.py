"""Real keys and signed tokens for the authentication tests, and a clock they can move.

Keys are generated once per test run (an RSA key takes a noticeable moment); every test
signs its own tokens with them, so nothing is a canned token that could go stale.
"""

from __future__ import annotations

import secrets
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

NOW = 1_700_000_000.0
ISSUER = "https://issuer.example"
AUDIENCE = "chat"
HMAC_SECRET = secrets.token_bytes(32)


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rsa_key(index: int = 0) -> rsa.RSAPrivateKey:
    """The same key for the same index all run long (``rsa_key()`` is ``rsa_key(0)``)."""
    return _rsa_key(index)


def ec_key(index: int = 0, curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    return _ec_key(index, curve)


@cache
def _rsa_key(index: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def _ec_key(index: int, curve: str) -> ec.EllipticCurvePrivateKey:
    curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
    return ec.generate_private_key(curves[curve])


def public_pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def private_pem(private: Any) -> bytes:
    return bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = algorithm.to_jwk(private.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims valid at :data:`NOW` for :data:`ISSUER` and :data:`AUDIENCE`."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": int(NOW),
        "exp": int(NOW) + 300,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(key: Any, alg: str, kid: str | None = None, payload: dict[str, Any] | None = None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims() if payload is None else payload, key, algorithm=alg, headers=headers)
