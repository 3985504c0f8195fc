"""A JWKS served by a real HTTP server on 127.0.0.1: caching, rotation, outages.

The server counts the requests it answers, so "one fetch" is measured where it happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from auth_support import ISSUER, FakeClock, claims, public_jwk, rsa_key, sign

from policy_engine.auth import (
    AuthenticationConfigError,
    AuthenticationError,
    AuthReason,
    JwksFetch,
    JwtVerifier,
    JwtVerifierSpec,
    RemoteJwks,
)

INTERVAL = 30.0
MAX_AGE = 300.0
SPEC = JwtVerifierSpec(name="idp", algorithms=("RS256",), issuer=ISSUER, leeway=0.0)


class JwksServer:
    """Serves ``document`` at ``/jwks``; a test rotates it, breaks it, or slows it down."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": [public_jwk(rsa_key(0), "k0", "RS256")]}
        self.requests = 0
        self.status = 200
        self.delay = 0.0
        self.url = ""

    def rotate(self, *indexes: int) -> None:
        self.document = {"keys": [public_jwk(rsa_key(i), f"k{i}", "RS256") for i in indexes]}

    async def handle(self, _request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        return web.json_response(self.document)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/jwks"
    yield server
    await runner.cleanup()


class Harness:
    def __init__(self, url: str) -> None:
        self.clock = FakeClock()
        self.reports: list[JwksFetch] = []
        self.source = RemoteJwks(
            url,
            ("RS256",),
            max_age=MAX_AGE,
            min_refresh_interval=INTERVAL,
            timeout=5.0,
            clock=self.clock,
            on_fetch=self.reports.append,
        )
        self.verifier = JwtVerifier(SPEC, self.source, clock=FakeClock())

    async def verify(self, index: int, kid: str | None = None) -> str:
        token = sign(rsa_key(index), "RS256", kid=f"k{index}" if kid is None else kid)
        return str((await self.verifier.verify(token)).claims["sub"])

    async def refusal(self, index: int, kid: str | None = None) -> AuthenticationError:
        with pytest.raises(AuthenticationError) as caught:
            await self.verify(index, kid)
        return caught.value

    async def settle(self, fetches: int) -> None:
        """Wait for a background fetch to have been reported."""
        for _ in range(500):
            if len(self.reports) >= fetches:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{fetches} fetches expected, {len(self.reports)} reported")


async def test_keys_are_fetched_once_and_then_cached(jwks_server: JwksServer) -> None:
    harness = Harness(jwks_server.url)
    assert await harness.verify(0) == "user-1"
    assert await harness.verify(0) == "user-1"
    assert jwks_server.requests == 1
    assert harness.reports[0].ok
    assert harness.reports[0].keys == 1


async def test_a_rotated_key_is_accepted_after_exactly_one_refresh(
    jwks_server: JwksServer,
) -> None:
    harness = Harness(jwks_server.url)
    await harness.verify(0)
    jwks_server.rotate(0, 1)
    harness.clock.advance(INTERVAL)
    assert await harness.verify(1) == "user-1"
    assert jwks_server.requests == 2
    assert await harness.verify(0) == "user-1"
    assert jwks_server.requests == 2


async def test_unknown_kids_refresh_at_most_once_per_interval(jwks_server: JwksServer) -> None:
    harness = Harness(jwks_server.url)
    await harness.verify(0)
    jwks_server.rotate(0, 1)
    # A key rotated just after start-up is found by one refresh, not after the interval.
    assert await harness.verify(1) == "user-1"
    assert jwks_server.requests == 2
    # Within the interval, made-up kids cost the identity provider nothing.
    for n in range(5):
        refusal = await harness.refusal(0, kid=f"invented-{n}")
        assert refusal.reason is AuthReason.UNKNOWN_KID
    harness.clock.advance(INTERVAL - 1)
    assert (await harness.refusal(0, kid="invented")).reason is AuthReason.UNKNOWN_KID
    assert jwks_server.requests == 2
    harness.clock.advance(1)
    assert (await harness.refusal(0, kid="invented")).reason is AuthReason.UNKNOWN_KID
    assert jwks_server.requests == 3


async def test_fifty_concurrent_unknown_kids_share_one_fetch(jwks_server: JwksServer) -> None:
    harness = Harness(jwks_server.url)
    await harness.verify(0)
    jwks_server.rotate(0, 1)
    jwks_server.delay = 0.05
    harness.clock.advance(INTERVAL)
    rotated = [harness.verify(1) for _ in range(25)]
    invented = [harness.verify(1, kid=f"invented-{n}") for n in range(25)]
    results = await asyncio.gather(*rotated, *invented, return_exceptions=True)
    assert results[:25] == ["user-1"] * 25
    assert all(
        isinstance(error, AuthenticationError) and error.reason is AuthReason.UNKNOWN_KID
        for error in results[25:]
    )
    assert jwks_server.requests == 2


async def test_a_failed_fetch_keeps_the_last_good_keys(jwks_server: JwksServer) -> None:
    harness = Harness(jwks_server.url)
    await harness.verify(0)
    jwks_server.status = 503
    harness.clock.advance(MAX_AGE)
    assert await harness.verify(0) == "user-1"  # stale keys serve while the refresh fails
    await harness.settle(2)
    failed = harness.reports[1]
    assert not failed.ok
    assert "503" in failed.error
    assert harness.source.failures == 1
    assert await harness.verify(0) == "user-1"
    assert (await harness.refusal(1)).reason is AuthReason.UNKNOWN_KID
    assert jwks_server.requests == 2  # no retry inside the interval
    jwks_server.status = 200
    jwks_server.rotate(1)
    harness.clock.advance(INTERVAL)
    assert await harness.verify(1) == "user-1"
    assert jwks_server.requests == 3
    assert (await harness.refusal(0)).reason is AuthReason.UNKNOWN_KID  # k0 rotated out


async def test_stale_keys_are_refreshed_in_the_background(jwks_server: JwksServer) -> None:
    harness = Harness(jwks_server.url)
    await harness.verify(0)
    jwks_server.rotate(0, 1)
    harness.clock.advance(MAX_AGE)
    jwks_server.delay = 0.05
    assert await harness.verify(0) == "user-1"
    await harness.settle(2)
    assert jwks_server.requests == 2
    assert await harness.verify(1) == "user-1"
    assert jwks_server.requests == 2


async def test_without_any_keys_a_token_is_refused_as_retryable(jwks_server: JwksServer) -> None:
    jwks_server.status = 500
    harness = Harness(jwks_server.url)
    error = await harness.refusal(0)
    assert error.reason is AuthReason.KEYS_UNAVAILABLE
    assert error.retryable
    assert (await harness.refusal(0)).reason is AuthReason.KEYS_UNAVAILABLE
    assert jwks_server.requests == 1
    jwks_server.status = 200
    harness.clock.advance(INTERVAL)
    assert await harness.verify(0) == "user-1"
    assert jwks_server.requests == 2


async def test_an_unreachable_server_is_reported(jwks_server: JwksServer) -> None:
    harness = Harness(jwks_server.url.replace("/jwks", "/missing"))
    assert (await harness.refusal(0)).reason is AuthReason.KEYS_UNAVAILABLE
    assert "404" in harness.source.last_error


async def test_tokens_refused_on_their_face_fetch_nothing(jwks_server: JwksServer) -> None:
    harness = Harness(jwks_server.url)
    await harness.verify(0)
    harness.clock.advance(INTERVAL)
    foreign = sign(rsa_key(1), "RS256", kid="k9", payload=claims(iss="https://other.example"))
    for token in ("garbage", "a.b.c", foreign, sign(rsa_key(1), "RS384", kid="k9")):
        with pytest.raises(AuthenticationError) as caught:
            await harness.verifier.verify(token)
        assert caught.value.reason is not AuthReason.UNKNOWN_KID
    assert jwks_server.requests == 1


async def test_a_jwks_without_usable_keys_is_a_failed_fetch(jwks_server: JwksServer) -> None:
    jwks_server.document = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k0"}]}
    harness = Harness(jwks_server.url)
    assert (await harness.refusal(0)).reason is AuthReason.KEYS_UNAVAILABLE
    assert "no key" in harness.reports[0].error


def test_only_http_urls_of_public_keys_are_accepted() -> None:
    with pytest.raises(AuthenticationConfigError, match="http"):
        RemoteJwks("file:///etc/passwd", ("RS256",))
    with pytest.raises(AuthenticationConfigError, match="local secret"):
        RemoteJwks("https://idp.example/jwks", ("HS256",))
