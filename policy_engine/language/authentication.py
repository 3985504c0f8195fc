"""The ``authentication`` section: who may vouch for a connection, and how it is checked.

Modelled on Envoy's ``jwt_authn``: named JWT providers (issuer, audiences, the algorithms
they sign with, where their keys and tokens are), named signed-session cookies, and per
namespace the providers that apply and whether a credential is required. These records
are the one home of the section's defaults; the ``auth`` package builds verifiers from
them, and only verified claims ever name the user.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Requirement(StrEnum):
    REQUIRED = "required"
    ALLOW_MISSING = "allow_missing"


class TokenPlace(StrEnum):
    HEADER = "header"
    AUTH = "auth"
    QUERY = "query"
    COOKIE = "cookie"


class KeyKind(StrEnum):
    PEM_FILE = "pem_file"
    ENV = "env"
    JWKS_FILE = "jwks_file"
    JWKS_URL = "jwks_url"


@dataclass(frozen=True, slots=True)
class TokenLocationSpec:
    """Where a token is read: ``header: Authorization`` with ``prefix: "Bearer "``, etc."""

    place: TokenPlace
    name: str
    prefix: str = ""


BEARER = TokenLocationSpec(TokenPlace.HEADER, "authorization", "Bearer ")


@dataclass(frozen=True, slots=True)
class KeySourceSpec:
    """One key source; file paths are resolved against the policy file's folder."""

    kind: KeyKind
    value: str
    kid: str | None = None
    max_age: float = 300.0
    min_refresh_interval: float = 30.0
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class JwtProviderSpec:
    name: str
    algorithms: tuple[str, ...]
    keys: KeySourceSpec
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    token_from: tuple[TokenLocationSpec, ...] = (BEARER,)
    required_claims: tuple[str, ...] = ("exp",)
    leeway: float = 30.0
    max_token_bytes: int = 8192


@dataclass(frozen=True, slots=True)
class SessionSpec:
    name: str
    cookie: str = "session"
    max_age: float = 86400.0
    secret_env: str = "POLICY_ENGINE_SESSION_SECRET"
    salt: str = "policy-engine.session"


@dataclass(frozen=True, slots=True)
class NamespaceAuthSpec:
    """Which providers (JWT, session or the application's loader, by name) apply, in order."""

    providers: tuple[str, ...] = ()
    require: Requirement = Requirement.REQUIRED


APP_LOADER = "app"
"""The name under which ``serve --claims-loader`` (or ``attach(claims_loader=...)``) is listed."""


@dataclass(frozen=True, slots=True)
class AuthenticationSpec:
    providers: tuple[JwtProviderSpec, ...] = ()
    sessions: tuple[SessionSpec, ...] = ()
    namespaces: Mapping[str, NamespaceAuthSpec] = field(
        default_factory=lambda: MappingProxyType({})
    )
    default: NamespaceAuthSpec | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.providers or self.sessions or self.namespaces or self.default)

    def for_namespace(self, namespace: str) -> NamespaceAuthSpec | None:
        return self.namespaces.get(namespace, self.default)
