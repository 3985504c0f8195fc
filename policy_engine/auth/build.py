"""From the compiled ``authentication`` section to one :class:`Authenticator` per namespace.

Built at start and again on every reload, because key files and secrets are read then. A
remote key set is the one thing worth keeping across a reload: a new policy naming the
same JWKS URL with the same settings gets the same :class:`RemoteJwks`, its cache and its
refresh budget, so a reload never turns into a burst of fetches at the identity provider.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from policy_engine.auth.authenticator import Authenticator, JwtProvider, LoaderProvider, Provider
from policy_engine.auth.handshake import Handshake
from policy_engine.auth.keys import KeySource, env_keys, jwks_file_keys, pem_file_keys
from policy_engine.auth.remote import RemoteJwks
from policy_engine.auth.session import SessionCookieSpec, SessionVerifier
from policy_engine.auth.token_source import TokenLocation, TokenSourceSpec
from policy_engine.auth.verifier import JwtVerifier, JwtVerifierSpec
from policy_engine.language.authentication import (
    APP_LOADER,
    AuthenticationSpec,
    JwtProviderSpec,
    KeyKind,
    KeySourceSpec,
    NamespaceAuthSpec,
    Requirement,
    TokenLocationSpec,
)

AppClaimsLoader = Callable[
    [Mapping[str, Any], Any], Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None
]
"""The application's own check: ``(environ, auth) -> claims``; ``None`` means no credential."""


@dataclass(frozen=True, slots=True)
class NamespaceAuthentication:
    authenticator: Authenticator
    requirement: Requirement


class AppLoader:
    """The application's ``(environ, auth)`` loader as a provider's loader."""

    def __init__(self, loader: AppClaimsLoader) -> None:
        self._loader = loader

    async def load(self, handshake: Handshake) -> Mapping[str, Any] | None:
        loaded = self._loader(handshake.environ, handshake.auth)
        if inspect.isawaitable(loaded):
            loaded = await loaded
        # No claims at all is no credential: anonymous, which the namespace may refuse.
        return dict(loaded) if isinstance(loaded, Mapping) and loaded else None


class Authenticators:
    """Each namespace's authentication, or None where the policy asks for none."""

    def __init__(
        self,
        spec: AuthenticationSpec,
        user_claim: str,
        *,
        app_loader: AppClaimsLoader | None = None,
        previous: Authenticators | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.remote: dict[KeySourceSpec, RemoteJwks] = {}
        kept = previous.remote if previous is not None else {}
        providers: dict[str, Provider] = {}
        for provider in spec.providers:
            providers[provider.name] = JwtProvider(
                JwtVerifier(_verifier_spec(provider), self._keys(provider, kept, environ)),
                TokenSourceSpec(tuple(_location(loc) for loc in provider.token_from)),
            )
        for session in spec.sessions:
            cookie = SessionCookieSpec(
                cookie=session.cookie,
                max_age=session.max_age,
                secret_env=session.secret_env,
                salt=session.salt,
            )
            verifier = SessionVerifier.from_env(cookie, environ)
            providers[session.name] = LoaderProvider(session.name, verifier, verifier.locations)
        if app_loader is not None:
            providers[APP_LOADER] = LoaderProvider(APP_LOADER, AppLoader(app_loader))
        self._providers = providers
        self._user_claim = user_claim
        self._namespaces: dict[str, NamespaceAuthentication | None] = {}

    def for_namespace(self, namespace: str) -> NamespaceAuthentication | None:
        if namespace not in self._namespaces:
            self._namespaces[namespace] = self._build(self.spec.for_namespace(namespace))
        return self._namespaces[namespace]

    async def prefetch(self) -> None:
        """Fetch every remote key set once, so the first client does not wait for it."""
        for source in self.remote.values():
            try:
                await source.current()
            except Exception:
                continue

    def _build(self, spec: NamespaceAuthSpec | None) -> NamespaceAuthentication | None:
        if spec is None:
            return None
        providers = [self._providers[name] for name in spec.providers if name in self._providers]
        return NamespaceAuthentication(Authenticator(providers, self._user_claim), spec.require)

    def _keys(
        self,
        provider: JwtProviderSpec,
        kept: Mapping[KeySourceSpec, RemoteJwks],
        environ: Mapping[str, str] | None,
    ) -> KeySource:
        keys = provider.keys
        match keys.kind:
            case KeyKind.PEM_FILE:
                return pem_file_keys(keys.value, provider.algorithms, keys.kid)
            case KeyKind.JWKS_FILE:
                return jwks_file_keys(keys.value, provider.algorithms)
            case KeyKind.ENV:
                return env_keys(keys.value, provider.algorithms, keys.kid, environ)
            case KeyKind.JWKS_URL:
                source = kept.get(keys)
                if source is None or source.algorithms != tuple(sorted(provider.algorithms)):
                    source = RemoteJwks(
                        keys.value,
                        provider.algorithms,
                        max_age=keys.max_age,
                        min_refresh_interval=keys.min_refresh_interval,
                        timeout=keys.timeout,
                    )
                self.remote[keys] = source
                return source


def _verifier_spec(provider: JwtProviderSpec) -> JwtVerifierSpec:
    return JwtVerifierSpec(
        name=provider.name,
        algorithms=provider.algorithms,
        issuer=provider.issuer,
        audiences=provider.audiences,
        leeway=provider.leeway,
        required_claims=provider.required_claims,
        max_token_bytes=provider.max_token_bytes,
    )


def _location(location: TokenLocationSpec) -> TokenLocation:
    return TokenLocation(location.place, location.name, location.prefix)
