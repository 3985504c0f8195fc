"""JWT verification: what is accepted, and the exact reason for each refusal."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from auth_support import (
    AUDIENCE,
    HMAC_SECRET,
    ISSUER,
    NOW,
    FakeClock,
    claims,
    ec_key,
    public_pem,
    rsa_key,
    sign,
)

from policy_engine.auth import (
    AUTH_EXPIRED,
    AUTH_FAILED,
    AuthenticationConfigError,
    AuthenticationError,
    AuthReason,
    JwtVerifier,
    JwtVerifierSpec,
    KeySet,
    StaticKeys,
    key_from_pem,
    key_from_secret,
    verify_token,
)

RSA_ALGS = ("RS256",)
EC_ALGS = ("ES256",)
HS_ALGS = ("HS256",)


def spec(algorithms: tuple[str, ...], **overrides: Any) -> JwtVerifierSpec:
    settings: dict[str, Any] = {"issuer": ISSUER, "audiences": (AUDIENCE,), "leeway": 0.0}
    settings.update(overrides)
    return JwtVerifierSpec(name="idp", algorithms=algorithms, **settings)


def rsa_keys(index: int = 0, kid: str | None = None) -> KeySet:
    return KeySet([key_from_pem(public_pem(rsa_key(index)), RSA_ALGS, kid)])


def refusal(
    token: str, verifier_spec: JwtVerifierSpec, keys: KeySet, now: float = NOW
) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        verify_token(token, verifier_spec, keys, now)
    assert not token or token not in str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    ("alg", "private", "keys"),
    [
        ("HS256", HMAC_SECRET, lambda: KeySet([key_from_secret(HMAC_SECRET, HS_ALGS)])),
        ("RS256", rsa_key(), rsa_keys),
        ("ES256", ec_key(), lambda: KeySet([key_from_pem(public_pem(ec_key()), EC_ALGS)])),
    ],
)
def test_a_valid_token_gives_its_claims(alg: str, private: Any, keys: Any) -> None:
    token = sign(private, alg, payload=claims(sub="alice", role="admin"))
    verified = verify_token(token, spec((alg,)), keys(), NOW)
    assert verified.claims["sub"] == "alice"
    assert verified.claims["role"] == "admin"
    assert (verified.provider, verified.algorithm) == ("idp", alg)


async def test_the_async_verifier_checks_against_its_clock() -> None:
    clock = FakeClock()
    verifier = JwtVerifier(spec(RSA_ALGS), StaticKeys(rsa_keys()), clock=clock)
    token = sign(rsa_key(), "RS256")
    assert (await verifier.verify(token)).claims["sub"] == "user-1"
    clock.advance(301)
    with pytest.raises(AuthenticationError) as caught:
        await verifier.verify(token)
    assert caught.value.code == AUTH_EXPIRED


def test_alg_none_is_refused() -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    error = refusal(token, spec(RSA_ALGS), rsa_keys())
    assert (error.code, error.reason) == (AUTH_FAILED, AuthReason.ALGORITHM_NOT_ALLOWED)


def test_alg_none_cannot_be_allowed() -> None:
    with pytest.raises(AuthenticationConfigError, match="none"):
        JwtVerifierSpec(name="idp", algorithms=("none",))


def test_hmac_with_the_rsa_public_pem_as_secret_is_refused() -> None:
    """The algorithm-confusion attack: the public key is public, so anyone can HMAC with it."""
    pem = public_pem(rsa_key())
    forged = _hmac_token(claims(sub="mallory"), pem)
    # Even a provider that allowed both families could not be fooled: the RSA key serves
    # RS*/PS* only. Such a provider is refused outright, so check with HS allowed alone too.
    error = refusal(forged, spec(RSA_ALGS), rsa_keys())
    assert error.reason is AuthReason.ALGORITHM_NOT_ALLOWED
    with pytest.raises(AuthenticationConfigError):
        key_from_secret(pem, HS_ALGS)
    with pytest.raises(AuthenticationConfigError):
        key_from_pem(pem, HS_ALGS)


def test_hmac_and_public_key_algorithms_cannot_share_a_provider() -> None:
    with pytest.raises(AuthenticationConfigError, match="two providers"):
        JwtVerifierSpec(name="idp", algorithms=("RS256", "HS256"))


def test_a_token_signed_by_another_key_is_refused() -> None:
    token = sign(rsa_key(1), "RS256")
    assert refusal(token, spec(RSA_ALGS), rsa_keys(0)).reason is AuthReason.BAD_SIGNATURE


def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = sign(rsa_key(), "RS256").split(".")
    payload = _b64(json.dumps(claims(sub="admin")).encode())
    token = f"{header}.{payload}.{signature}"
    assert refusal(token, spec(RSA_ALGS), rsa_keys()).reason is AuthReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (claims(iss="https://elsewhere.example"), AuthReason.WRONG_ISSUER),
        (claims(iss=None), AuthReason.WRONG_ISSUER),
        (claims(aud="other-app"), AuthReason.WRONG_AUDIENCE),
        (claims(aud=["other-app", 7]), AuthReason.WRONG_AUDIENCE),
        (claims(aud=None), AuthReason.WRONG_AUDIENCE),
        (claims(exp=None), AuthReason.MISSING_CLAIM),
        (claims(exp="tomorrow"), AuthReason.INVALID_CLAIM),
        (claims(nbf=int(NOW) + 60), AuthReason.NOT_YET_VALID),
        (claims(iat=int(NOW) + 60), AuthReason.NOT_YET_VALID),
    ],
)
def test_each_failed_claim_check_has_its_reason(
    payload: dict[str, Any], reason: AuthReason
) -> None:
    error = refusal(sign(rsa_key(), "RS256", payload=payload), spec(RSA_ALGS), rsa_keys())
    assert (error.code, error.reason) == (AUTH_FAILED, reason)


def test_an_audience_list_needs_one_accepted_member() -> None:
    token = sign(rsa_key(), "RS256", payload=claims(aud=["other-app", AUDIENCE]))
    assert verify_token(token, spec(RSA_ALGS), rsa_keys(), NOW).claims["sub"] == "user-1"


def test_an_expired_token_is_auth_expired() -> None:
    token = sign(rsa_key(), "RS256", payload=claims(exp=int(NOW) - 1))
    error = refusal(token, spec(RSA_ALGS), rsa_keys())
    assert (error.code, error.reason) == (AUTH_EXPIRED, AuthReason.EXPIRED)
    assert not error.retryable


def test_expiry_and_not_before_within_the_leeway_are_accepted() -> None:
    lenient = spec(RSA_ALGS, leeway=30.0)
    expired_lately = sign(rsa_key(), "RS256", payload=claims(exp=int(NOW) - 20))
    starts_soon = sign(rsa_key(), "RS256", payload=claims(nbf=int(NOW) + 20))
    assert verify_token(expired_lately, lenient, rsa_keys(), NOW).claims
    assert verify_token(starts_soon, lenient, rsa_keys(), NOW).claims
    assert refusal(expired_lately, lenient, rsa_keys(), NOW + 11).reason is AuthReason.EXPIRED


def test_required_claims_are_required() -> None:
    strict = spec(RSA_ALGS, required_claims=("exp", "tenant"))
    error = refusal(sign(rsa_key(), "RS256"), strict, rsa_keys())
    assert error.reason is AuthReason.MISSING_CLAIM
    assert "tenant" in str(error)
    token = sign(rsa_key(), "RS256", payload=claims(tenant="acme"))
    assert verify_token(token, strict, rsa_keys(), NOW).claims["tenant"] == "acme"


def test_unchecked_issuer_and_audience_when_none_are_configured() -> None:
    loose = JwtVerifierSpec(name="idp", algorithms=RSA_ALGS, leeway=0.0)
    token = sign(rsa_key(), "RS256", payload=claims(iss="anyone", aud=None))
    assert verify_token(token, loose, rsa_keys(), NOW).claims["iss"] == "anyone"


def test_an_oversize_token_is_refused_before_parsing() -> None:
    small = spec(RSA_ALGS, max_token_bytes=100)
    error = refusal("x" * 101, small, rsa_keys())
    assert error.reason is AuthReason.TOO_LARGE


@pytest.mark.parametrize(
    "token",
    ["", "not-a-token", "a.b.c", "é.b.c", "eyJhbGciOiJSUzI1NiJ9.!!!.sig", "a.b.c.d"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert refusal(token, spec(RSA_ALGS), rsa_keys()).reason is AuthReason.MALFORMED


def test_a_payload_that_is_not_an_object_is_malformed() -> None:
    token = jwt.api_jws.encode(b"[1, 2]", HMAC_SECRET, algorithm="HS256")
    keys = KeySet([key_from_secret(HMAC_SECRET, HS_ALGS)])
    assert refusal(token, spec(HS_ALGS), keys).reason is AuthReason.MALFORMED


def test_critical_header_extensions_are_refused() -> None:
    token = jwt.encode(claims(), rsa_key(), algorithm="RS256", headers={"crit": ["exp"]})
    assert refusal(token, spec(RSA_ALGS), rsa_keys()).reason is AuthReason.MALFORMED


def test_an_allowed_algorithm_without_a_key_for_it_is_refused() -> None:
    """RS384 is allowed, but the only key is an EC key: nothing can verify the token."""
    ec_only = KeySet([key_from_pem(public_pem(ec_key()), ("ES256", "RS384"))])
    token = sign(rsa_key(), "RS384")
    error = refusal(token, spec(("ES256", "RS384")), ec_only)
    assert error.reason is AuthReason.ALGORITHM_NOT_ALLOWED


def test_a_kid_no_key_has_is_unknown() -> None:
    token = sign(rsa_key(), "RS256", kid="next")
    error = refusal(token, spec(RSA_ALGS), rsa_keys(kid="current"))
    assert error.reason is AuthReason.UNKNOWN_KID


def test_a_key_without_kid_verifies_tokens_naming_any_kid() -> None:
    token = sign(rsa_key(), "RS256", kid="whatever")
    assert verify_token(token, spec(RSA_ALGS), rsa_keys(kid=None), NOW).key_id == "whatever"


def test_the_error_text_names_the_check_not_the_token() -> None:
    token = sign(rsa_key(1), "RS256")
    error = refusal(token, spec(RSA_ALGS), rsa_keys(0))
    assert str(error) == "AUTH_FAILED: bad_signature"


def test_spec_settings_are_checked() -> None:
    with pytest.raises(AuthenticationConfigError):
        JwtVerifierSpec(name="idp", algorithms=())
    with pytest.raises(AuthenticationConfigError):
        JwtVerifierSpec(name="idp", algorithms=("RS256",), leeway=-1)
    with pytest.raises(AuthenticationConfigError, match="XS256"):
        JwtVerifierSpec(name="idp", algorithms=("XS256",))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hmac_token(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token signed by hand: PyJWT itself refuses a PEM as an HMAC secret."""
    import hashlib
    import hmac

    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(mac)}"
