"""Verification keys, each bound to the algorithms it may verify, and the static sources.

A key is never a bare string handed to whichever algorithm a token names: an RSA public
key is bound to ``RS*``/``PS*``, an EC key to the one ``ES*`` its curve serves, a shared
secret to ``HS*``. So a token that says ``HS256`` finds no key when only an RSA key is
configured, and the RSA key's PEM can never be used as an HMAC secret (the classic
algorithm-confusion attack). Keys are checked when they are loaded (no private keys, RSA
of at least 2048 bits, HMAC secrets at least as long as the hash) so a bad key stops a
start instead of refusing clients later.

Static sources (a PEM file, an environment variable, a JWKS file) are read once, when
built; :mod:`policy_engine.auth.remote` fetches, caches and rotates a JWKS URL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from policy_engine.auth.failures import AuthenticationConfigError

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_CURVES: Mapping[str, str] = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
EDDSA_ALGORITHMS = frozenset({"EdDSA"})
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | RSA_ALGORITHMS | frozenset(EC_CURVES) | EDDSA_ALGORITHMS

MIN_RSA_BITS = 2048
_HMAC_MIN_BYTES: Mapping[str, int] = {"HS256": 32, "HS384": 48, "HS512": 64}
_PEM_MARK = b"-----BEGIN"


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key or shared secret, the algorithms it may verify, and its ``kid``.

    A key without a ``kid`` matches any token; a key with one matches only tokens naming it.
    """

    algorithms: frozenset[str]
    material: Any = field(repr=False)
    kid: str | None = None


class KeySet:
    """The keys of one provider, looked up by ``kid`` on every verification."""

    __slots__ = ("_anonymous", "_by_kid", "keys")

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self.keys = tuple(keys)
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in self.keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        self._by_kid = {kid: tuple(found) for kid, found in by_kid.items()}
        self._anonymous = tuple(key for key in self.keys if key.kid is None)

    def __len__(self) -> int:
        return len(self.keys)

    def knows(self, kid: str | None) -> bool:
        """Whether a token naming ``kid`` has any key to try (keys without a kid always do)."""
        return kid is None or kid in self._by_kid or bool(self._anonymous)

    def candidates(self, kid: str | None, algorithm: str) -> tuple[VerificationKey, ...]:
        """The keys that may verify a token with this ``kid`` and ``alg``, named ones first."""
        pool = self.keys if kid is None else self._by_kid.get(kid, ()) + self._anonymous
        return tuple(key for key in pool if algorithm in key.algorithms)


class KeySource(Protocol):
    """Where a verifier gets its keys; remote sources refresh when a ``kid`` is unknown."""

    async def current(self) -> KeySet: ...

    async def refresh_for_unknown_kid(self) -> KeySet: ...


class StaticKeys:
    """Keys read once (from a file or the environment); a refresh finds nothing new."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys

    async def current(self) -> KeySet:
        return self.keys

    async def refresh_for_unknown_kid(self) -> KeySet:
        return self.keys


def check_algorithms(algorithms: Iterable[str]) -> frozenset[str]:
    """The allow-list as a set; ``none``, unknown names and HS mixed with public keys refused.

    One provider either shares a secret with its issuer or holds its public keys, never both:
    with both, a configuration slip could hand a public key to HMAC.
    """
    allowed = frozenset(algorithms)
    if not allowed:
        raise AuthenticationConfigError("algorithms must name at least one algorithm")
    unknown = sorted(alg for alg in allowed if alg not in SUPPORTED_ALGORITHMS)
    if unknown:
        raise AuthenticationConfigError(
            f"algorithms not supported: {', '.join(unknown)} "
            f"(supported: {', '.join(sorted(SUPPORTED_ALGORITHMS))}; 'none' never is)"
        )
    if allowed & HMAC_ALGORITHMS and allowed - HMAC_ALGORITHMS:
        raise AuthenticationConfigError(
            "HS* and public-key algorithms cannot share a provider: use two providers"
        )
    return allowed


def bind(material: Any, allowed: Iterable[str], declared: str | None = None) -> frozenset[str]:
    """The algorithms of ``allowed`` (narrowed to ``declared``, a JWK's ``alg``) this key serves."""
    wanted = frozenset(allowed) if declared is None else frozenset(allowed) & {declared}
    return frozenset(alg for alg in wanted if _serves(material, alg))


def key_from_pem(pem: bytes, algorithms: Iterable[str], kid: str | None = None) -> VerificationKey:
    """A public key or certificate in PEM; a private key is refused (it does not belong here)."""
    if b"PRIVATE KEY" in pem:
        raise AuthenticationConfigError(
            "a private key was given; a verifier needs only the public key"
        )
    try:
        if b"CERTIFICATE" in pem:
            public: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            public = load_pem_public_key(pem)
    except ValueError as error:
        raise AuthenticationConfigError(f"not a PEM public key or certificate: {error}") from None
    return _bound(public, algorithms, kid)


def key_from_secret(
    secret: bytes, algorithms: Iterable[str], kid: str | None = None
) -> VerificationKey:
    """An HMAC secret; one that looks like a PEM key is refused, whatever it would verify."""
    if secret.lstrip().startswith(_PEM_MARK):
        raise AuthenticationConfigError("an HMAC secret must not be a PEM key")
    return _bound(secret, algorithms, kid)


def key_from_jwk(
    jwk: Mapping[str, Any], algorithms: Iterable[str], *, allow_symmetric: bool
) -> VerificationKey | None:
    """One JWK, or None when it is not for signatures or verifies none of ``algorithms``."""
    if jwk.get("use", "sig") != "sig" or (jwk.get("kty") == "oct" and not allow_symmetric):
        return None
    declared = jwk.get("alg")
    kid = jwk.get("kid")
    if not isinstance(declared, str | None) or not isinstance(kid, str | None):
        return None
    try:
        material = jwt.PyJWK(dict(jwk), algorithm=declared).key
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return None
    if callable(getattr(material, "public_key", None)):
        material = material.public_key()  # a JWK with private parts: use only the public one
    try:
        return _bound(material, algorithms, kid, declared)
    except AuthenticationConfigError:
        return None


def keyset_from_jwks(
    document: Any, algorithms: Iterable[str], *, allow_symmetric: bool = False
) -> KeySet:
    """The usable signing keys of a JWKS document; a document with none is an error."""
    allowed = tuple(algorithms)
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise AuthenticationConfigError("a JWKS document is an object with a 'keys' list")
    keys = [
        key
        for entry in entries
        if isinstance(entry, Mapping)
        and (key := key_from_jwk(entry, allowed, allow_symmetric=allow_symmetric)) is not None
    ]
    if not keys:
        raise AuthenticationConfigError(f"the JWKS has no key for {', '.join(sorted(allowed))}")
    return KeySet(keys)


def pem_file_keys(
    path: str | Path, algorithms: Iterable[str], kid: str | None = None
) -> StaticKeys:
    return StaticKeys(KeySet([key_from_pem(_read(path), algorithms, kid)]))


def jwks_file_keys(path: str | Path, algorithms: Iterable[str]) -> StaticKeys:
    """A JWKS on disk; it may hold ``oct`` (HMAC) keys, unlike one fetched over HTTP."""
    try:
        document = json.loads(_read(path))
    except ValueError as error:
        raise AuthenticationConfigError(f"{path}: not JSON: {error}") from None
    return StaticKeys(keyset_from_jwks(document, algorithms, allow_symmetric=True))


def env_keys(
    variable: str,
    algorithms: Iterable[str],
    kid: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> StaticKeys:
    """A PEM public key or an HMAC secret (its UTF-8 bytes) in an environment variable.

    Which one it is follows from the provider's algorithms, not from the value's shape, so
    an HS provider refuses a PEM value instead of treating it as a secret.
    """
    value = (os.environ if environ is None else environ).get(variable, "")
    if not value:
        raise AuthenticationConfigError(f"environment variable {variable} is not set")
    allowed = check_algorithms(algorithms)
    data = value.encode()
    if allowed <= HMAC_ALGORITHMS:
        return StaticKeys(KeySet([key_from_secret(data, allowed, kid)]))
    return StaticKeys(KeySet([key_from_pem(data, allowed, kid)]))


def _bound(
    material: Any, algorithms: Iterable[str], kid: str | None, declared: str | None = None
) -> VerificationKey:
    _check_strength(material)
    allowed = frozenset(algorithms)
    served = bind(material, allowed, declared)
    if isinstance(material, bytes):
        served = frozenset(alg for alg in served if len(material) >= _HMAC_MIN_BYTES[alg])
        if not served and allowed & HMAC_ALGORITHMS:
            shortest = min(_HMAC_MIN_BYTES[alg] for alg in allowed & HMAC_ALGORITHMS)
            raise AuthenticationConfigError(
                f"the HMAC secret has {len(material)} bytes; at least {shortest} are needed"
            )
    if not served:
        raise AuthenticationConfigError(
            f"a {_kind(material)} key cannot verify any of {', '.join(sorted(allowed))}"
        )
    return VerificationKey(algorithms=served, material=material, kid=kid)


def _serves(material: Any, algorithm: str) -> bool:
    if algorithm in HMAC_ALGORITHMS:
        return isinstance(material, bytes)
    if algorithm in RSA_ALGORITHMS:
        return isinstance(material, rsa.RSAPublicKey)
    if algorithm in EC_CURVES:
        return (
            isinstance(material, ec.EllipticCurvePublicKey)
            and material.curve.name == EC_CURVES[algorithm]
        )
    if algorithm in EDDSA_ALGORITHMS:
        return isinstance(material, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def _check_strength(material: Any) -> None:
    if isinstance(material, rsa.RSAPublicKey) and material.key_size < MIN_RSA_BITS:
        raise AuthenticationConfigError(
            f"the RSA key has {material.key_size} bits; at least {MIN_RSA_BITS} are needed"
        )


def _kind(material: Any) -> str:
    if isinstance(material, bytes):
        return "shared-secret"
    if isinstance(material, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(material, ec.EllipticCurvePublicKey):
        return f"EC {material.curve.name}"
    return type(material).__name__


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise AuthenticationConfigError(f"{path}: {error.strerror or error}") from None
