"""``identity``: which proxies are believed and where a connection's identity is read."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import IdentitySpec

_FIELDS: Mapping[str, Convert] = {
    "trusted_proxies": tuple,
    "user_claim": str,
    "user_param": str,
    "trust_client_user_id": bool,
    "max_identifier_length": int,
    "ipv6_prefix": int,
    "conversation_param": str,
    "token_param": str,
}


def build_identity(c: Compilation, raw: Mapping[str, Any] | None) -> IdentitySpec:
    spec = c.record(IdentitySpec, raw, "/identity", _FIELDS)
    for index, network in enumerate(spec.trusted_proxies):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            c.error(
                f"/identity/trusted_proxies/{index}",
                "bad-network",
                f"{network!r} is not an IP network",
                "write an address or a CIDR block, for example 10.0.0.0/8",
            )
    if spec.trust_client_user_id:
        c.warn(
            "/identity/trust_client_user_id",
            "client-chosen-identity",
            "connections name their own user: any client can be any user to per-user rules",
            "for development only; in production the user comes from verified claims",
        )
    return spec
