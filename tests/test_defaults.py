"""Defaults are written once, in the model; the schema documents the same figures."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, fields
from typing import Any

import pytest

from policy_engine.compiler.pipeline import compile_text
from policy_engine.language.authentication import (
    JwtProviderSpec,
    KeySourceSpec,
    NamespaceAuthSpec,
    SessionSpec,
)
from policy_engine.language.model import (
    AdmissionSpec,
    AuthFailureSpec,
    AuthorizationSpec,
    AuthzRuleSpec,
    BackoffSpec,
    CircuitBreakerSpec,
    ConnectionsSpec,
    DecisionLogSpec,
    DefaultsSpec,
    DrainSpec,
    ErrorRuleSpec,
    EventSpec,
    IdentitySpec,
    LoadSpec,
    OutboundSpec,
    OverloadSpec,
    ProtocolSpec,
    RateLimitSpec,
    RecoverySpec,
    SheddingRuleSpec,
    SlowCallSpec,
)
from policy_engine.language.schema import policy_schema
from policy_engine.language.units import parse_duration, parse_percent, parse_rate, parse_size

# Each object of the schema whose properties have defaults, and the record they fill.
RECORDS: Mapping[str, type] = {
    "/$defs/defaults": DefaultsSpec,
    "/$defs/identity": IdentitySpec,
    "/$defs/error_rule": ErrorRuleSpec,
    "/$defs/backoff_policy": BackoffSpec,
    "/$defs/rate_limit": RateLimitSpec,
    "/$defs/circuit_breaker": CircuitBreakerSpec,
    "/$defs/circuit_breaker/properties/slow_call": SlowCallSpec,
    "/$defs/shedding_rule": SheddingRuleSpec,
    "/$defs/load": LoadSpec,
    "/$defs/load/properties/overloaded": OverloadSpec,
    "/$defs/connections": ConnectionsSpec,
    "/$defs/connections/properties/auth_failures": AuthFailureSpec,
    "/$defs/connections/properties/outbound": OutboundSpec,
    "/$defs/connections/properties/protocol": ProtocolSpec,
    "/$defs/connections/properties/queue": AdmissionSpec,
    "/$defs/recovery": RecoverySpec,
    "/$defs/drain": DrainSpec,
    "/$defs/decision_log": DecisionLogSpec,
    "/$defs/event_rule": EventSpec,
    "/$defs/authorization": AuthorizationSpec,
    "/$defs/authorization/properties/rules/items": AuthzRuleSpec,
    "/$defs/key_source": KeySourceSpec,
    "/$defs/jwt_provider": JwtProviderSpec,
    "/$defs/session_cookie": SessionSpec,
    "/$defs/namespace_auth": NamespaceAuthSpec,
}
# How the schema writes a value whose model field holds it resolved.
UNITS: Mapping[str, Callable[[Any], Any]] = {
    "#/$defs/duration": parse_duration,
    "#/$defs/percent": parse_percent,
    "#/$defs/size": parse_size,
    "#/$defs/rate": parse_rate,
}


def schema_defaults(node: Any, pointer: str = "") -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(object pointer, property name, property schema) for every property with a default."""
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            if isinstance(prop, dict) and "default" in prop:
                yield pointer, name, prop
        for key, child in node.items():
            yield from schema_defaults(child, f"{pointer}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from schema_defaults(child, f"{pointer}/{index}")


def model_default(record: type, name: str) -> Any:
    (found,) = [f for f in fields(record) if f.name == name]
    assert found.default is not MISSING, f"{record.__name__}.{name} has no default"
    return found.default


DOCUMENTED = {(pointer, name): prop for pointer, name, prop in schema_defaults(policy_schema())}


def test_the_walk_finds_the_schema_defaults() -> None:
    assert len(DOCUMENTED) >= 40
    assert ("/$defs/rate_limit", "max_keys") in DOCUMENTED
    assert ("/$defs/connections/properties/auth_failures", "window") in DOCUMENTED


@pytest.mark.parametrize(("pointer", "name"), sorted(DOCUMENTED))
def test_every_schema_default_is_the_model_default(pointer: str, name: str) -> None:
    assert pointer in RECORDS, f"map the schema object {pointer} to its model record"
    written = DOCUMENTED[pointer, name]
    resolve = UNITS.get(written.get("$ref", ""), lambda value: value)
    expected = resolve(written["default"])
    if isinstance(expected, list):
        expected = tuple(expected)
    assert model_default(RECORDS[pointer], name) == expected


def test_a_policy_that_sets_nothing_gets_the_model_defaults() -> None:
    policy = compile_text("version: 1\n").policy
    assert policy.defaults == DefaultsSpec()
    assert policy.identity == IdentitySpec()
    assert policy.connections == ConnectionsSpec()
    assert policy.recovery == RecoverySpec()
    assert policy.recovery.events == ()  # no event is replayed unless the policy names it
    assert policy.authorization == AuthorizationSpec()
    assert policy.default_event == EventSpec("*")


def test_a_rule_that_sets_only_what_is_required_gets_the_model_defaults() -> None:
    policy = compile_text(
        "version: 1\n"
        "rate_limits: [{name: a, hook: connect, key: conn.ip, limit: 5/s}]\n"
        "circuit_breakers: [{name: b, match: 'true', slow_call: {over: 2s}}]\n"
        "errors: [{name: c, when: 'true', category: client, code: BAD}]\n"
    ).policy
    (limit,) = policy.rate_limits
    assert (limit.algorithm, limit.scope, limit.max_keys, limit.burst) == (
        model_default(RateLimitSpec, "algorithm"),
        model_default(RateLimitSpec, "scope"),
        model_default(RateLimitSpec, "max_keys"),
        5,  # a burst defaults to the limit's own count
    )
    (breaker,) = policy.circuit_breakers
    assert breaker.window == model_default(CircuitBreakerSpec, "window")
    assert breaker.open_for == model_default(CircuitBreakerSpec, "open_for")
    assert breaker.slow_call == SlowCallSpec(over=2.0)
    (error,) = policy.errors
    assert (error.severity, error.retryable, error.backoff) == (
        model_default(ErrorRuleSpec, "severity"),
        model_default(ErrorRuleSpec, "retryable"),
        policy.defaults.backoff,
    )
    assert error.message == "The request was invalid."
