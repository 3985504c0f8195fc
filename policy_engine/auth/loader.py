"""The contract for an application's own claims loader, and finding one by name.

Some applications already know who is connecting (their own session store, an API key
table): they plug a loader in instead of, or besides, JWT providers, as
``serve --claims-loader package.module:attr``. The loader gets the parsed handshake and:

- returns the claims (a mapping) of a proven identity;
- returns ``None`` when the handshake carries no credential it recognises (anonymous,
  which a namespace may allow or refuse);
- raises :class:`~policy_engine.auth.failures.AuthenticationError` when a credential is present but
  wrong (refused, with that reason); any other exception is a failure of the loader, which
  the policy's failure handling classifies like any handler error.

It must not block the event loop: do I/O with ``await``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from policy_engine.auth.failures import AuthenticationConfigError
from policy_engine.auth.handshake import Handshake


@runtime_checkable
class HandshakeClaimsLoader(Protocol):
    async def load(self, handshake: Handshake) -> Mapping[str, Any] | None: ...


def import_claims_loader(target: str) -> HandshakeClaimsLoader:
    """``"module:attr"`` -> the loader; a class there is instantiated without arguments."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise AuthenticationConfigError(
            f"a claims loader is named 'module:attribute', not {target!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise AuthenticationConfigError(f"cannot import {module_name!r}: {error}") from None
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise AuthenticationConfigError(f"{module_name!r} has no {attribute!r}") from None
    if inspect.isclass(found):
        found = found()
    if not isinstance(found, HandshakeClaimsLoader) or not inspect.iscoroutinefunction(found.load):
        raise AuthenticationConfigError(
            f"{target}: needs an 'async def load(self, handshake)' method"
        )
    return found
