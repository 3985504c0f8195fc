"""A namespace's providers in order, required versus anonymous, and the user id."""

from __future__ import annotations

import pytest
from auth_support import HMAC_SECRET, ISSUER, NOW, FakeClock, claims, public_pem, rsa_key, sign

from policy_engine.auth import (
    AuthenticationError,
    Authenticator,
    AuthReason,
    Handshake,
    JwtProvider,
    JwtVerifier,
    JwtVerifierSpec,
    KeySet,
    LoaderProvider,
    Requirement,
    SessionCookieSpec,
    SessionVerifier,
    StaticKeys,
    TokenLocation,
    TokenPlace,
    TokenSourceSpec,
    key_from_pem,
    key_from_secret,
)

AUTH_FIELD = TokenLocation(TokenPlace.AUTH, "token")
PARTNER = "https://partner.example"


def rsa_provider() -> JwtProvider:
    spec = JwtVerifierSpec(name="idp", algorithms=("RS256",), issuer=ISSUER)
    keys = StaticKeys(KeySet([key_from_pem(public_pem(rsa_key()), ("RS256",))]))
    return JwtProvider(JwtVerifier(spec, keys, clock=FakeClock()))


def hmac_provider() -> JwtProvider:
    spec = JwtVerifierSpec(name="partner", algorithms=("HS256",), issuer=PARTNER)
    keys = StaticKeys(KeySet([key_from_secret(HMAC_SECRET, ("HS256",))]))
    verifier = JwtVerifier(spec, keys, clock=FakeClock())
    return JwtProvider(verifier, TokenSourceSpec(locations=(AUTH_FIELD,)))


def bearer(token: str) -> Handshake:
    return Handshake(headers={"authorization": f"Bearer {token}"})


async def refusal(
    authenticator: Authenticator,
    handshake: Handshake,
    requirement: Requirement = Requirement.REQUIRED,
) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        await authenticator.authenticate(handshake, requirement)
    return caught.value


async def test_a_verified_token_names_the_user() -> None:
    authenticator = Authenticator([rsa_provider()])
    result = await authenticator.authenticate(bearer(sign(rsa_key(), "RS256")))
    assert (result.provider, result.user_id, result.anonymous) == ("idp", "user-1", False)
    assert result.claims["iss"] == ISSUER


async def test_the_user_claim_is_configurable_and_required() -> None:
    token = sign(rsa_key(), "RS256", payload=claims(email="a@example.com", uid=7))
    assert (await Authenticator([rsa_provider()], "email").authenticate(bearer(token))).user_id == (
        "a@example.com"
    )
    assert (await Authenticator([rsa_provider()], "uid").authenticate(bearer(token))).user_id == "7"
    error = await refusal(Authenticator([rsa_provider()], "tenant_user"), bearer(token))
    assert error.reason is AuthReason.MISSING_CLAIM


async def test_a_missing_token_is_refused_where_required_and_anonymous_elsewhere() -> None:
    authenticator = Authenticator([rsa_provider()])
    assert (await refusal(authenticator, Handshake())).reason is AuthReason.MISSING
    result = await authenticator.authenticate(Handshake(), Requirement.ALLOW_MISSING)
    assert result.anonymous
    assert result.user_id == ""
    assert dict(result.claims) == {}


async def test_a_bad_token_is_refused_even_where_anonymous_is_allowed() -> None:
    authenticator = Authenticator([rsa_provider()])
    expired = sign(rsa_key(), "RS256", payload=claims(exp=int(NOW) - 600))
    error = await refusal(authenticator, bearer(expired), Requirement.ALLOW_MISSING)
    assert error.reason is AuthReason.EXPIRED


async def test_a_token_only_in_an_unnamed_place_is_not_used_and_is_reported() -> None:
    authenticator = Authenticator([rsa_provider()])
    handshake = Handshake(query={"token": sign(rsa_key(), "RS256")})
    error = await refusal(authenticator, handshake)
    assert (error.reason, error.detail) == (AuthReason.UNEXPECTED_LOCATION, "query:token")
    anonymous = await authenticator.authenticate(handshake, Requirement.ALLOW_MISSING)
    assert (anonymous.anonymous, anonymous.unexpected) == (True, ("query:token",))


async def test_each_provider_reads_its_own_place_and_the_first_to_verify_decides() -> None:
    authenticator = Authenticator([rsa_provider(), hmac_provider()])
    partner = sign(HMAC_SECRET, "HS256", payload=claims(iss=PARTNER, sub="p-1"))
    result = await authenticator.authenticate(Handshake(auth={"token": partner}))
    assert (result.provider, result.user_id) == ("partner", "p-1")
    both = Handshake(
        headers={"authorization": f"Bearer {sign(rsa_key(), 'RS256')}"}, auth={"token": partner}
    )
    assert (await authenticator.authenticate(both)).provider == "idp"


async def test_with_several_providers_the_telling_refusal_is_kept() -> None:
    """The partner token in the header: the idp provider refuses it; the partner provider
    does not read headers; the refusal says why the idp refused it."""
    authenticator = Authenticator([hmac_provider(), rsa_provider()])
    forged = sign(rsa_key(1), "RS256")
    assert (await refusal(authenticator, bearer(forged))).reason is AuthReason.BAD_SIGNATURE


async def test_a_session_cookie_provider_alongside_jwt() -> None:
    session = SessionVerifier(SessionCookieSpec(cookie="sid"), ["s" * 32], clock=FakeClock())
    authenticator = Authenticator(
        [rsa_provider(), LoaderProvider("session", session, session.locations)]
    )
    cookie = session.sign({"sub": "web-user"})
    result = await authenticator.authenticate(Handshake(headers={"cookie": f"sid={cookie}"}))
    assert (result.provider, result.user_id, result.unexpected) == ("session", "web-user", ())
    error = await refusal(authenticator, Handshake(headers={"cookie": f"sid={cookie}x"}))
    assert error.reason is AuthReason.BAD_SIGNATURE


async def test_the_provider_cap_applies_where_the_token_is_read() -> None:
    spec = JwtVerifierSpec(name="idp", algorithms=("RS256",), max_token_bytes=100)
    keys = StaticKeys(KeySet([key_from_pem(public_pem(rsa_key()), ("RS256",))]))
    authenticator = Authenticator([JwtProvider(JwtVerifier(spec, keys))])
    handshake = Handshake(auth={"token": "x" * 101})
    provider = JwtProvider(JwtVerifier(spec, keys), TokenSourceSpec(locations=(AUTH_FIELD,)))
    assert (await refusal(Authenticator([provider]), handshake)).reason is AuthReason.TOO_LARGE
    assert (await refusal(authenticator, bearer("x" * 101))).reason is AuthReason.TOO_LARGE
