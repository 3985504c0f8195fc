"""The sections stage: one builder per policy section, each reading only what it needs.

Builders run in dependency order (``defaults`` and ``backoff`` first, since rules fall back
to the one and refer to the other) and read only the parts of the file the schema passed,
so a file with schema errors still gets every expression and semantic check its valid
parts allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from policy_engine.compiler.compilation import Compilation
from policy_engine.compiler.sections.authentication import build_authentication
from policy_engine.compiler.sections.authorization import build_authorization
from policy_engine.compiler.sections.backoff import backoff_names, build_backoff
from policy_engine.compiler.sections.circuit_breakers import build_circuit_breakers
from policy_engine.compiler.sections.connections import build_connections
from policy_engine.compiler.sections.decision_log import build_decision_log
from policy_engine.compiler.sections.defaults import build_defaults
from policy_engine.compiler.sections.drain import build_drain
from policy_engine.compiler.sections.errors import build_errors
from policy_engine.compiler.sections.events import ANY_EVENT, build_events
from policy_engine.compiler.sections.identity import build_identity
from policy_engine.compiler.sections.load import build_load
from policy_engine.compiler.sections.rate_limits import build_rate_limits
from policy_engine.compiler.sections.recovery import build_recovery
from policy_engine.compiler.sections.shedding import build_shedding
from policy_engine.language.authentication import AuthenticationSpec
from policy_engine.language.model import (
    BUILTIN_BACKOFF,
    AuthorizationSpec,
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
    RateLimitSpec,
    RecoverySpec,
    SheddingRuleSpec,
)


@dataclass(frozen=True, slots=True)
class Sections:
    """Every section of a policy, compiled; the planner turns them into a PolicySet.

    A section left out is the model's default, so a test can build a policy from the one
    section it is about: ``plan(Sections(rate_limits=(...,)), version=..., source=...)``.
    """

    defaults: DefaultsSpec = field(default_factory=DefaultsSpec)
    identity: IdentitySpec = field(default_factory=IdentitySpec)
    errors: tuple[ErrorRuleSpec, ...] = ()
    backoff: Mapping[str, BackoffSpec] = field(default_factory=lambda: BUILTIN_BACKOFF)
    rate_limits: tuple[RateLimitSpec, ...] = ()
    circuit_breakers: tuple[CircuitBreakerSpec, ...] = ()
    shedding: tuple[SheddingRuleSpec, ...] = ()
    connections: ConnectionsSpec = field(default_factory=ConnectionsSpec)
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    events: Mapping[str, EventSpec] = field(default_factory=lambda: MappingProxyType({}))
    default_event: EventSpec = field(default_factory=lambda: EventSpec(ANY_EVENT))
    authorization: AuthorizationSpec = field(default_factory=AuthorizationSpec)
    authentication: AuthenticationSpec = field(default_factory=AuthenticationSpec)
    drain: DrainSpec = field(default_factory=DrainSpec)
    load: LoadSpec = field(default_factory=LoadSpec)
    decision_log: DecisionLogSpec | None = None


def build_sections(c: Compilation) -> Sections:
    data: Mapping[str, Any] = c.document.data
    defaults = build_defaults(c, c.section("defaults"))
    backoff = build_backoff(c, data.get("backoff"))
    names = backoff_names(c, data.get("backoff"))
    c.check_backoff_ref(defaults.backoff, "/defaults/backoff", names)
    events, default_event = build_events(c, data.get("events"))
    return Sections(
        defaults=defaults,
        identity=build_identity(c, c.section("identity")),
        authentication=build_authentication(c, c.section("authentication")),
        errors=build_errors(c, data.get("errors"), defaults, names),
        backoff=backoff,
        rate_limits=build_rate_limits(c, data.get("rate_limits"), defaults),
        circuit_breakers=build_circuit_breakers(c, data.get("circuit_breakers"), defaults),
        shedding=build_shedding(c, data.get("shedding"), defaults),
        load=build_load(c, c.section("load")),
        connections=build_connections(c, c.section("connections"), names),
        recovery=build_recovery(c, c.section("recovery")),
        drain=build_drain(c, c.section("drain")),
        decision_log=build_decision_log(c, data.get("decision_log")),
        events=events,
        default_event=default_event,
        authorization=build_authorization(
            c,
            data.get("authorization", {}) if c.schema.sound("/authorization") else None,
            defaults,
        ),
    )
