"""The CORS headers the overload gate adds: Engine.IO's rules, applied to an ASGI scope."""

from __future__ import annotations

from typing import Any

import pytest

from policy_engine.adapter.cors import CorsPolicy


def scope_from(origin: str | None, host: str = "chat.example", **extra: str) -> dict[str, Any]:
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    headers += [(name.encode(), value.encode()) for name, value in extra.items()]
    return {"type": "http", "scheme": "https", "method": "GET", "headers": headers}


def allow_origin(policy: CorsPolicy, scope: dict[str, Any]) -> bytes | None:
    return dict(policy.headers(scope)).get(b"access-control-allow-origin")


@pytest.mark.parametrize(
    ("allowed", "origin", "expected"),
    [
        (None, "http://chat.example", True),  # the server's own origin
        (None, "https://chat.example", False),  # Engine.IO takes http unless a proxy says
        (None, "https://other.example", False),
        ("*", "https://other.example", True),
        ("https://other.example", "https://other.example", True),
        (["https://a.example", "https://b.example"], "https://b.example", True),
        (["https://a.example"], "https://b.example", False),
        (lambda origin: origin.endswith(".example"), "https://b.example", True),
        (lambda origin, environ: environ["HTTP_HOST"] in origin, "http://chat.example", True),
        (lambda origin, environ: False, "https://chat.example", False),
    ],
)
def test_cors_follows_engineio_s_allowed_origins(allowed: Any, origin: str, expected: bool):
    header = allow_origin(CorsPolicy(allowed), scope_from(origin))
    assert header == (origin.encode() if expected else None)


def test_cors_trusts_the_origin_a_proxy_names_and_can_be_switched_off():
    forwarded = {"x-forwarded-host": "public.example", "x-forwarded-proto": "https"}
    behind_proxy = scope_from("https://public.example", host="10.0.0.5:8000", **forwarded)
    assert allow_origin(CorsPolicy(None), behind_proxy) == b"https://public.example"
    own_over_tls = scope_from("https://chat.example", **{"x-forwarded-proto": "https"})
    assert allow_origin(CorsPolicy(None), own_over_tls) == b"https://chat.example"
    assert CorsPolicy([]).headers(scope_from("https://chat.example")) == []
    assert CorsPolicy("*", credentials=False).headers(scope_from(None)) == []
