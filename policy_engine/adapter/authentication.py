"""Authentication at the connect hook: the policy's providers, or the application's loader.

The verifiers of a policy are built when it is installed (at attach, and by the reloader
before a new policy is swapped in, so a policy whose keys cannot be read is refused like a
policy with a syntax error) and kept per policy version. A policy without an
``authentication`` section keeps the older contract: the application's claims loader, if
any, vouches for the claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.adapter.identity import (
    ClaimsLoader,
    Identity,
    load_claims,
    query_params,
    scope_headers,
)
from policy_engine.auth.build import Authenticators
from policy_engine.auth.handshake import Handshake
from policy_engine.auth.loader import HandshakeClaimsLoader
from policy_engine.language.model import PolicySet


def handshake_of(environ: Mapping[str, Any], auth: Any) -> Handshake:
    """The credential places of an Engine.IO handshake, unmasked, for verifiers only."""
    scope: Mapping[str, Any] = environ.get("asgi.scope") or {}
    return Handshake(
        headers=scope_headers(scope),
        query=query_params(str(environ.get("QUERY_STRING", ""))),
        auth=auth if isinstance(auth, Mapping) else {},
        environ=environ,
    )


def environ_loader(loader: ClaimsLoader | HandshakeClaimsLoader) -> ClaimsLoader:
    """An application's loader in the adapter's ``(environ, auth)`` form, whichever it has."""
    if isinstance(loader, HandshakeClaimsLoader):
        bound = loader

        async def load(environ: Mapping[str, Any], auth: Any) -> Mapping[str, Any] | None:
            return await bound.load(handshake_of(environ, auth))

        return load
    return loader


class ConnectAuthentication:
    """Who a handshake proves to be: (claims, verified user id), or an exception to classify."""

    def __init__(self, claims_loader: ClaimsLoader | None) -> None:
        self.claims_loader = claims_loader
        self._built: dict[str, Authenticators | None] = {}

    def prepare(self, policy: PolicySet) -> None:
        """Build ``policy``'s verifiers now; raises when its keys cannot be read."""
        if policy.version in self._built:
            return
        built = None
        if policy.authentication.enabled:
            previous = next((a for a in reversed(self._built.values()) if a is not None), None)
            built = Authenticators(
                policy.authentication,
                policy.identity.user_claim,
                app_loader=self.claims_loader,
                previous=previous,
            )
        # The policy in force and the one about to be: older versions are let go.
        self._built = {**dict(list(self._built.items())[-1:]), policy.version: built}

    async def prefetch(self, policy: PolicySet) -> None:
        self.prepare(policy)
        built = self._built[policy.version]
        if built is not None:
            await built.prefetch()

    async def authenticate(
        self,
        policy: PolicySet,
        namespace: str,
        environ: Mapping[str, Any],
        auth: Any,
        identity: Identity,
    ) -> tuple[dict[str, Any], str]:
        """``identity`` is the handshake as already read (:func:`identify`): its unmasked
        headers and query are what the verifiers look in."""
        self.prepare(policy)
        built = self._built[policy.version]
        spec = built.for_namespace(namespace) if built is not None else None
        if spec is None:
            claims = await load_claims(environ, auth, self.claims_loader)
            user = claims.get(policy.identity.user_claim)
            if isinstance(user, int) and not isinstance(user, bool):
                user = str(user)
            return claims, user if isinstance(user, str) else ""
        handshake = Handshake(
            headers=identity.raw_headers,
            query=identity.raw_query,
            auth=auth if isinstance(auth, Mapping) else {},
            environ=environ,
        )
        result = await spec.authenticator.authenticate(handshake, spec.requirement)
        return dict(result.claims), result.user_id
