"""Who is connecting, read from an Engine.IO environ and its ASGI scope."""

from __future__ import annotations

from typing import Any

import pytest

from policy_engine.adapter.identity import (
    MASK,
    NO_EVENT_ID,
    IdentityError,
    address_key,
    client_claims,
    client_ip,
    handshake_value,
    identify,
    load_claims,
    query_params,
    scope_headers,
)
from policy_engine.language.model import IdentitySpec

PROXIES = ("10.0.0.0/8", "127.0.0.1/32")
SPEC = IdentitySpec(trusted_proxies=PROXIES)


def scope(peer: str = "192.0.2.1", headers: dict[str, str] | None = None, **extra: Any):
    return {
        "type": "websocket",
        "client": (peer, 51234),
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        **extra,
    }


def environ(query: str = "", **scope_args: Any) -> dict[str, Any]:
    # Engine.IO's ASGI environ: REMOTE_ADDR is always loopback, whoever connects.
    return {"QUERY_STRING": query, "REMOTE_ADDR": "127.0.0.1", "asgi.scope": scope(**scope_args)}


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("192.0.2.1", None, "192.0.2.1"),
        ("192.0.2.1", "198.51.100.7", "192.0.2.1"),  # an untrusted peer cannot claim
        ("10.1.2.3", "198.51.100.7", "198.51.100.7"),
        ("10.1.2.3", "6.6.6.6, 198.51.100.7, 10.9.9.9", "198.51.100.7"),  # rightmost untrusted
        ("10.1.2.3", "10.2.2.2, 10.9.9.9", "10.2.2.2"),  # every hop trusted: the first one
        ("10.1.2.3", "198.51.100.7, not-an-ip", "10.1.2.3"),  # a forged tail is not believed
        ("127.0.0.1", "2001:db8::1", "2001:db8::1"),
    ],
)
def test_the_client_address_trusts_forwarded_for_only_from_trusted_proxies(
    peer, forwarded, expected
):
    headers = {"x-forwarded-for": forwarded} if forwarded else {}

    assert client_ip(scope(peer), headers, PROXIES) == expected


def test_without_trusted_proxies_the_peer_is_the_client():
    assert client_ip(scope("10.1.2.3"), {"x-forwarded-for": "1.2.3.4"}, ()) == "10.1.2.3"


def test_a_scope_without_a_client_has_no_address():
    assert client_ip({"type": "http"}, {}, PROXIES) == ""


def test_headers_are_lower_cased_and_repeats_joined():
    raw = {"type": "http", "headers": [(b"X-Tag", b"a"), (b"x-tag", b"b"), (b"Host", b"h")]}

    assert scope_headers(raw) == {"x-tag": "a, b", "host": "h"}


def test_query_parameters_keep_the_first_value():
    assert query_params("a=1&b=&a=2") == {"a": "1", "b": ""}


def test_an_identifier_given_twice_with_different_values_is_refused():
    query = "conversation_id=public&conversation_id=secret&latest_event_id=0"
    with pytest.raises(IdentityError, match="conversation_id"):
        identify(environ(query), None, SPEC, {})
    # The application's reader sees no conversation at all, never one of the two.
    assert handshake_value(environ(query), None, "conversation_id") == ""
    # The same value twice is not ambiguous.
    same = environ("conversation_id=c&conversation_id=c")
    assert identify(same, None, SPEC, {}).conversation_id == "c"
    assert handshake_value(same, None, "conversation_id") == "c"


def test_a_client_chosen_user_id_is_ignored_unless_the_policy_trusts_it():
    found = identify(environ("user_id=alice"), {"user_id": "alice"}, SPEC, {})
    assert found.user_id == ""
    trusting = IdentitySpec(trust_client_user_id=True)
    assert identify(environ("user_id=alice"), None, trusting, {}).user_id == "alice"
    assert identify(environ("user_id=alice"), None, trusting, {"sub": "bob"}).user_id == "bob"


@pytest.mark.parametrize(
    ("query", "auth", "headers"),
    [
        ("conversation_id=" + "c" * 257, None, {}),
        ("anything=" + "v" * 8193, None, {}),
        ("n" * 257 + "=v", None, {}),
        ("", {"conversation_id": "c" * 257}, {}),
        ("", {"user_id": "u" * 500_000}, {}),
        ("", None, {"x-tenant": "t" * 8193}),
    ],
)
def test_every_client_supplied_identifier_is_bounded(query, auth, headers):
    with pytest.raises(IdentityError, match="longer than"):
        identify(environ(query, headers=headers), auth, SPEC, {})


def test_an_application_query_parameter_may_be_long():
    found = identify(environ("jwt=" + "e" * 900 + "&next=/a"), None, SPEC, {})
    assert found.query["next"] == "/a"


def test_ordinary_browser_headers_are_not_refused():
    headers = {"referer": "https://app.example/c?" + "q=1&" * 200, "user-agent": "Mozilla " * 60}
    found = identify(environ("", headers=headers), None, SPEC, {})
    assert found.headers["referer"].startswith("https://app.example/c?")


def test_a_parameter_named_like_an_argument_is_only_a_parameter():
    found = identify(environ("limit=1&values=2&spec=3"), None, SPEC, {})
    assert found.query == {"limit": "1", "values": "2", "spec": "3"}


@pytest.mark.parametrize(
    ("address", "prefix", "key"),
    [
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", 128, "2001:db8:1:2:bbbb::9"),
        ("2001:db8:1:2:bbbb::9", 48, "2001:db8:1::/48"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("192.0.2.7", 64, "192.0.2.7"),
        ("not-an-address", 64, "not-an-address"),
    ],
)
def test_ipv6_clients_are_keyed_by_their_network(address, prefix, key):
    assert address_key(address, prefix) == key


def test_identifiers_come_from_auth_then_query():
    found = identify(
        environ("conversation_id=q-conv&user_id=q-user&latest_event_id=12"),
        {"conversation_id": "auth-conv"},
        SPEC,
        {},
    )

    assert found.conversation_id == "auth-conv"
    assert found.user_id == ""  # never the client's own word
    assert found.latest_event_id == 12
    assert found.ip == "192.0.2.1"
    assert found.transport == "websocket"


def test_the_user_comes_from_the_verified_claim_first():
    spec = IdentitySpec(user_claim="uid")

    found = identify(environ("user_id=claimed"), {"user_id": "asserted"}, spec, {"uid": 42})

    assert found.user_id == "42"


def test_the_token_comes_from_auth_query_or_a_bearer_header():
    by_header = identify(environ(headers={"authorization": "Bearer abc"}), None, SPEC, {})
    by_query = identify(environ("token=from-query"), None, SPEC, {})
    by_auth = identify(environ("token=from-query"), {"token": "from-auth"}, SPEC, {})

    assert (by_header.token, by_query.token, by_auth.token) == ("abc", "from-query", "from-auth")


def test_secrets_are_masked_in_what_rules_and_logs_see():
    found = identify(
        environ(
            "token=t&session_api_key=k&conversation_id=c",
            headers={"Authorization": "Bearer t", "Cookie": "s=1", "Origin": "https://app"},
        ),
        None,
        SPEC,
        {},
    )

    assert found.query == {"token": MASK, "session_api_key": MASK, "conversation_id": "c"}
    assert found.headers["authorization"] == MASK
    assert found.headers["cookie"] == MASK
    assert found.origin == "https://app"
    assert "token=" not in repr(found)  # the token itself is kept out of reprs and logs
    assert found.token == "t"


@pytest.mark.parametrize("value", ["", "x", "-5", "1.5"])
def test_a_missing_or_malformed_latest_event_id_means_none(value):
    assert identify(environ(f"latest_event_id={value}"), None, SPEC, {}).latest_event_id == (
        NO_EVENT_ID
    )


def test_polling_handshakes_are_reported_as_polling():
    found = identify({"QUERY_STRING": "", "asgi.scope": {"type": "http"}}, None, SPEC, {})

    assert found.transport == "polling"


async def test_claims_come_from_the_loader_sync_or_async_and_never_from_the_client():
    async def async_loader(environ: Any, auth: Any) -> dict[str, Any]:
        return {"sub": auth["token"]}

    sent = {"claims": {"role": "admin"}, "token": "u1"}

    assert await load_claims({}, sent, async_loader) == {"sub": "u1"}
    assert await load_claims({}, sent, lambda e, a: {"sub": "s"}) == {"sub": "s"}
    assert await load_claims({}, sent, lambda e, a: None) == {}


async def test_without_a_loader_a_client_cannot_grant_itself_claims():
    assert await load_claims({}, {"claims": {"role": "admin"}}, None) == {}
    assert await load_claims({}, None, None) == {}


async def test_the_client_claims_loader_trusts_the_auth_payload_on_purpose():
    assert await load_claims({}, {"claims": {"plan": "pro"}}, client_claims) == {"plan": "pro"}
    assert await load_claims({}, {"claims": "not a map"}, client_claims) == {}
    assert await load_claims({}, None, client_claims) == {}


async def test_a_loader_failure_propagates_to_be_classified():
    def failing(environ: Any, auth: Any) -> dict[str, Any]:
        raise PermissionError("expired")

    with pytest.raises(PermissionError):
        await load_claims({}, {}, failing)
