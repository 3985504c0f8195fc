"""``authentication``: JWT providers, session cookies and what each namespace requires.

Everything that can be known without the keys is checked here, with a location: names a
namespace lists that nothing defines, an algorithm list mixing HMAC with public-key
algorithms (the key-confusion attack needs exactly that), key files that do not exist.
Keys themselves are read when the server builds its verifiers, at start and on reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.errors import did_you_mean
from policy_engine.language.authentication import (
    APP_LOADER,
    AuthenticationSpec,
    JwtProviderSpec,
    KeyKind,
    KeySourceSpec,
    NamespaceAuthSpec,
    Requirement,
    SessionSpec,
    TokenLocationSpec,
    TokenPlace,
)
from policy_engine.language.units import parse_duration, parse_size

_KEY_FIELDS: Mapping[str, Convert] = {
    "kid": str,
    "max_age": parse_duration,
    "min_refresh_interval": parse_duration,
    "timeout": parse_duration,
}
_PROVIDER_FIELDS: Mapping[str, Convert] = {
    "issuer": str,
    "audiences": tuple,
    "required_claims": tuple,
    "leeway": parse_duration,
    "max_token_bytes": parse_size,
}
_SESSION_FIELDS: Mapping[str, Convert] = {
    "cookie": str,
    "max_age": parse_duration,
    "secret_env": str,
    "salt": str,
}
_NAMESPACE_FIELDS: Mapping[str, Convert] = {"providers": tuple, "require": Requirement}


def build_authentication(c: Compilation, raw: Mapping[str, Any] | None) -> AuthenticationSpec:
    if raw is None:
        return AuthenticationSpec()
    providers = tuple(
        provider
        for name, pointer, body in c.entries(raw.get("providers"), "/authentication/providers")
        if (provider := _provider(c, name, pointer, body)) is not None
    )
    sessions = tuple(
        SessionSpec(name=name, **c.read(body, pointer, _SESSION_FIELDS))
        for name, pointer, body in c.entries(raw.get("sessions"), "/authentication/sessions")
    )
    # Every provider the file defines, built or not: one broken provider is one error, not
    # one more for each namespace that lists it.
    written = raw.get("providers")
    defined = {str(name) for name in written} if isinstance(written, Mapping) else set()
    known = frozenset(defined | {s.name for s in sessions} | {APP_LOADER})
    namespaces = {
        name: _namespace(c, body, pointer, known)
        for name, pointer, body in c.entries(raw.get("namespaces"), "/authentication/namespaces")
    }
    default = None
    if "default" in raw and c.schema.intact("/authentication/default"):
        default = _namespace(c, raw["default"], "/authentication/default", known)
    _check_names_unique(c, providers, sessions)
    return AuthenticationSpec(
        providers=providers,
        sessions=sessions,
        namespaces=MappingProxyType(namespaces),
        default=default,
    )


def _provider(
    c: Compilation, name: str, pointer: str, body: Mapping[str, Any]
) -> JwtProviderSpec | None:
    algorithms = tuple(body["algorithms"])
    hmac = [a for a in algorithms if a.startswith("HS")]
    if hmac and len(hmac) != len(algorithms):
        c.error(
            f"{pointer}/algorithms",
            "mixed-key-families",
            f"provider {name!r} mixes HMAC ({', '.join(hmac)}) with public-key algorithms",
            "a key shared by both lets a public key be used as an HMAC secret: "
            "declare two providers",
        )
        return None
    keys = _keys(c, body["keys"], f"{pointer}/keys", hmac=bool(hmac))
    if keys is None:
        return None
    fields = c.read(body, pointer, _PROVIDER_FIELDS)
    if "from" in body:
        fields["token_from"] = tuple(_location(entry) for entry in body["from"])
    return JwtProviderSpec(name=name, algorithms=algorithms, keys=keys, **fields)


def _keys(
    c: Compilation, body: Mapping[str, Any], pointer: str, *, hmac: bool
) -> KeySourceSpec | None:
    kind = next(k for k in KeyKind if k.value in body)
    value = str(body[kind.value])
    if kind is KeyKind.JWKS_URL and hmac:
        c.error(
            f"{pointer}/jwks_url",
            "remote-secret",
            "a JWKS URL cannot hold HMAC secrets for HS algorithms",
            "publish public keys (RS*, ES*, PS*, EdDSA), or read the secret from env",
        )
        return None
    if kind in (KeyKind.PEM_FILE, KeyKind.JWKS_FILE):
        path = (c.base_dir / value).resolve()
        if not path.is_file():
            c.error(
                f"{pointer}/{kind.value}",
                "missing-key-file",
                f"key file {value!r} does not exist ({path})",
                "paths are relative to the policy file",
            )
            return None
        value = str(path)
    return KeySourceSpec(kind=kind, value=value, **c.read(body, pointer, _KEY_FIELDS))


def _location(entry: Mapping[str, Any]) -> TokenLocationSpec:
    place = next(p for p in TokenPlace if p.value in entry)
    name = str(entry[place.value])
    if place is TokenPlace.HEADER:
        name = name.lower()
    return TokenLocationSpec(place=place, name=name, prefix=str(entry.get("prefix", "")))


def _namespace(
    c: Compilation, body: Mapping[str, Any], pointer: str, known: frozenset[str]
) -> NamespaceAuthSpec:
    spec = NamespaceAuthSpec(**c.read(body, pointer, _NAMESPACE_FIELDS))
    for index, name in enumerate(spec.providers):
        if name not in known:
            c.error(
                f"{pointer}/providers/{index}",
                "unknown-provider",
                f"no provider or session is named {name!r}",
                did_you_mean(name, sorted(known), "define it under authentication.providers"),
            )
    return spec


def _check_names_unique(
    c: Compilation, providers: tuple[JwtProviderSpec, ...], sessions: tuple[SessionSpec, ...]
) -> None:
    for session in sessions:
        if session.name == APP_LOADER or any(p.name == session.name for p in providers):
            c.error(
                f"/authentication/sessions/{session.name}",
                "duplicate-name",
                f"{session.name!r} names a provider already (or the application's loader)",
                "give every provider and session its own name",
            )
    for provider in providers:
        if provider.name == APP_LOADER:
            c.error(
                f"/authentication/providers/{provider.name}",
                "duplicate-name",
                f"{APP_LOADER!r} is the application's claims loader",
                "choose another name",
            )
