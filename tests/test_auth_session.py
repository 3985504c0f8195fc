"""Signed session cookies: valid, tampered, expired, rotated secrets; the loader contract."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
from auth_support import NOW, FakeClock

from policy_engine.auth import (
    AUTH_EXPIRED,
    AUTH_FAILED,
    AuthenticationConfigError,
    AuthenticationError,
    AuthReason,
    Handshake,
    HandshakeClaimsLoader,
    SessionCookieSpec,
    SessionVerifier,
    import_claims_loader,
)

SECRET = "s" * 32
SPEC = SessionCookieSpec(cookie="sid", max_age=3600)


def verifier(clock: FakeClock, *secrets: str) -> SessionVerifier:
    return SessionVerifier(SPEC, secrets or (SECRET,), clock=clock)


def refusal(session: SessionVerifier, cookie: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        session.verify(cookie)
    return caught.value


def test_a_signed_cookie_gives_its_claims() -> None:
    session = verifier(FakeClock())
    cookie = session.sign({"sub": "alice", "roles": ["admin"]})
    assert dict(session.verify(cookie)) == {"sub": "alice", "roles": ["admin"]}


def test_a_tampered_cookie_is_refused() -> None:
    session = verifier(FakeClock())
    cookie = session.sign({"sub": "alice"})
    payload, timestamp, signature = cookie.split(".")
    forged = verifier(FakeClock(), "o" * 32).sign({"sub": "admin"})
    for bad in (
        f"{forged.split('.')[0]}.{timestamp}.{signature}",
        f"{payload}.{timestamp}.{signature[:-2]}xx",
        forged,
        "garbage",
    ):
        error = refusal(session, bad)
        assert (error.code, error.reason) == (AUTH_FAILED, AuthReason.BAD_SIGNATURE)


def test_an_old_cookie_is_expired() -> None:
    clock = FakeClock()
    session = verifier(clock)
    cookie = session.sign({"sub": "alice"})
    clock.advance(3600)
    assert session.verify(cookie)["sub"] == "alice"
    clock.advance(1)
    error = refusal(session, cookie)
    assert (error.code, error.reason) == (AUTH_EXPIRED, AuthReason.EXPIRED)


def test_a_rotated_secret_still_accepts_cookies_of_the_previous_one() -> None:
    clock = FakeClock()
    old = verifier(clock, "o" * 32).sign({"sub": "alice"})
    rotated = verifier(clock, "o" * 32, SECRET)
    assert rotated.verify(old)["sub"] == "alice"
    assert verifier(clock, SECRET).verify(rotated.sign({"sub": "bob"}))["sub"] == "bob"


def test_the_secret_comes_from_the_environment_and_must_be_long() -> None:
    clock = FakeClock(NOW)
    environ = {SPEC.secret_env: f"{'o' * 32} {SECRET}"}
    session = SessionVerifier.from_env(SPEC, environ, clock=clock)
    assert session.verify(verifier(clock, SECRET).sign({"sub": "a"}))["sub"] == "a"
    with pytest.raises(AuthenticationConfigError, match="not set"):
        SessionVerifier.from_env(SPEC, {})
    with pytest.raises(AuthenticationConfigError, match="32 bytes"):
        SessionVerifier(SPEC, ["short"])


def test_an_oversize_cookie_is_refused() -> None:
    assert refusal(verifier(FakeClock()), "x" * 4097).reason is AuthReason.TOO_LARGE


async def test_the_verifier_is_a_claims_loader_reading_its_cookie() -> None:
    session = verifier(FakeClock())
    assert isinstance(session, HandshakeClaimsLoader)
    cookie = session.sign({"sub": "alice"})
    loaded = await session.load(Handshake(headers={"cookie": f"theme=dark; sid={cookie}"}))
    assert loaded is not None
    assert loaded["sub"] == "alice"
    assert await session.load(Handshake(headers={"cookie": "theme=dark"})) is None


class AppLoader:
    async def load(self, handshake: Handshake) -> dict[str, str] | None:
        key = handshake.headers.get("x-api-key")
        return {"sub": "service"} if key == "k" else None


class SyncLoader:
    def load(self, handshake: Handshake) -> None:
        return None


@pytest.fixture
def loaders_module() -> Iterator[str]:
    module = types.ModuleType("auth_test_loaders")
    module.AppLoader = AppLoader  # type: ignore[attr-defined]
    module.SyncLoader = SyncLoader  # type: ignore[attr-defined]
    module.instance = AppLoader()  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module.__name__
    del sys.modules[module.__name__]


async def test_a_claims_loader_is_found_by_module_and_attribute(loaders_module: str) -> None:
    for target in (f"{loaders_module}:AppLoader", f"{loaders_module}:instance"):
        loader = import_claims_loader(target)
        assert await loader.load(Handshake(headers={"x-api-key": "k"})) == {"sub": "service"}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", "module:attribute"),
        ("auth_test_no_such_module:x", "cannot import"),
        ("{module}:Missing", "has no"),
        ("{module}:SyncLoader", "async def load"),
    ],
)
def test_a_wrong_claims_loader_name_is_a_config_error(
    loaders_module: str, target: str, message: str
) -> None:
    with pytest.raises(AuthenticationConfigError, match=message):
        import_claims_loader(target.format(module=loaders_module))
