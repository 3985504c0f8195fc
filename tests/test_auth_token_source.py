"""Reading the token only where the policy says, and naming where else one turned up."""

from __future__ import annotations

import pytest
from auth_support import HMAC_SECRET, sign

from policy_engine.auth import (
    BEARER_HEADER,
    AuthenticationConfigError,
    AuthenticationError,
    AuthReason,
    Handshake,
    TokenLocation,
    TokenPlace,
    TokenSourceSpec,
    extract_token,
    unexpected_tokens,
)

TOKEN = sign(HMAC_SECRET, "HS256")
HEADER_ONLY = TokenSourceSpec()
AUTH_FIELD = TokenLocation(TokenPlace.AUTH, "token")
QUERY_PARAM = TokenLocation(TokenPlace.QUERY, "access_token")
COOKIE = TokenLocation(TokenPlace.COOKIE, "jwt")


def test_the_bearer_header_is_the_default_place() -> None:
    found = extract_token(HEADER_ONLY, Handshake(headers={"Authorization": f"Bearer {TOKEN}"}))
    assert (found.token, found.location) == (TOKEN, BEARER_HEADER)


def test_the_prefix_is_matched_ignoring_case_and_required() -> None:
    assert extract_token(HEADER_ONLY, Handshake(headers={"authorization": f"bearer {TOKEN}"})).token
    assert not extract_token(
        HEADER_ONLY, Handshake(headers={"authorization": f"Basic {TOKEN}"})
    ).token
    assert not extract_token(HEADER_ONLY, Handshake(headers={"authorization": "Bearer "})).token


@pytest.mark.parametrize(
    ("location", "handshake"),
    [
        (AUTH_FIELD, Handshake(auth={"token": TOKEN})),
        (QUERY_PARAM, Handshake(query={"access_token": TOKEN})),
        (COOKIE, Handshake(headers={"cookie": f"theme=dark; jwt={TOKEN}; other=1"})),
        (TokenLocation(TokenPlace.HEADER, "X-Token"), Handshake(headers={"x-token": TOKEN})),
    ],
)
def test_each_kind_of_place(location: TokenLocation, handshake: Handshake) -> None:
    found = extract_token(TokenSourceSpec(locations=(location,)), handshake)
    assert (found.token, found.location) == (TOKEN, location)


def test_a_token_in_the_query_is_not_used_when_the_policy_names_the_header() -> None:
    handshake = Handshake(query={"token": TOKEN, "room": "1"})
    assert extract_token(HEADER_ONLY, handshake).token == ""
    assert unexpected_tokens(handshake, HEADER_ONLY.locations) == ("query:token",)


def test_the_places_are_tried_in_the_policy_order() -> None:
    spec = TokenSourceSpec(locations=(AUTH_FIELD, BEARER_HEADER))
    handshake = Handshake(auth={"token": "first"}, headers={"authorization": "Bearer second"})
    assert extract_token(spec, handshake).token == "first"
    assert extract_token(spec, Handshake(headers={"authorization": "Bearer second"})).token == (
        "second"
    )


def test_an_oversize_token_is_refused_before_it_is_parsed() -> None:
    spec = TokenSourceSpec(locations=(AUTH_FIELD,))
    with pytest.raises(AuthenticationError) as caught:
        extract_token(spec, Handshake(auth={"token": "x" * 8193}))
    assert caught.value.reason is AuthReason.TOO_LARGE
    assert extract_token(spec, Handshake(auth={"token": "x" * 8192})).token


def test_the_header_prefix_does_not_count_against_the_cap() -> None:
    header = Handshake(headers={"authorization": "Bearer " + "x" * 10})
    assert extract_token(HEADER_ONLY, header, max_bytes=10).token
    with pytest.raises(AuthenticationError):
        extract_token(HEADER_ONLY, header, max_bytes=9)


def test_a_token_that_is_not_text_is_malformed() -> None:
    with pytest.raises(AuthenticationError) as caught:
        extract_token(TokenSourceSpec(locations=(AUTH_FIELD,)), Handshake(auth={"token": 42}))
    assert caught.value.reason is AuthReason.MALFORMED


def test_unexpected_places_are_named_never_valued() -> None:
    handshake = Handshake(
        headers={"authorization": f"Bearer {TOKEN}", "x-custom": TOKEN, "user-agent": "x"},
        query={"jwt": "abc", "room": "1"},
        auth={"access_token": "abc", "conversation_id": "c1", "token": ""},
    )
    stray = unexpected_tokens(handshake, (QUERY_PARAM,))
    assert stray == ("auth:access_token", "header:authorization", "header:x-custom", "query:jwt")
    assert unexpected_tokens(handshake, (BEARER_HEADER,))[1:] == ("header:x-custom", "query:jwt")


def test_a_jwt_shaped_value_under_any_name_is_noticed() -> None:
    handshake = Handshake(query={"q": TOKEN}, headers={"cookie": f"sid={TOKEN}"})
    assert unexpected_tokens(handshake, ()) == ("cookie:sid", "query:q")


def test_a_wsgi_environ_gives_the_same_handshake() -> None:
    environ = {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}", "HTTP_X_TOKEN": "t", "PATH_INFO": "/"}
    handshake = Handshake.from_wsgi_environ(environ, query={}, auth=None)
    assert handshake.headers == {"authorization": f"Bearer {TOKEN}", "x-token": "t"}
    assert extract_token(HEADER_ONLY, handshake).token == TOKEN


def test_cookies_parse_leniently() -> None:
    handshake = Handshake(headers={"cookie": 'a=1; broken; b="two"; a=3; =x'})
    assert handshake.cookies == {"a": "1", "b": "two"}


def test_location_settings_are_checked() -> None:
    with pytest.raises(AuthenticationConfigError):
        TokenLocation(TokenPlace.QUERY, "token", prefix="Bearer ")
    with pytest.raises(AuthenticationConfigError):
        TokenLocation(TokenPlace.AUTH, "")
    with pytest.raises(AuthenticationConfigError):
        TokenSourceSpec(locations=())
