"""A warning for comprehensions whose cost the client chooses.

``exists``, ``all``, ``exists_one``, ``filter`` and ``map`` over a list the client sends
(``event.payload.tags``) run once per element; ``filter`` and ``map`` build lists as they
go, so their cost grows faster than the list. The engine bounds what one event may make
conditions read, but only the event's schema bounds it per event: a comprehension over a
list no schema gives ``maxItems`` is reported, once per rule and event.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from policy_engine.cel.analysis import comprehensions_over
from policy_engine.compiler.compilation import Compilation
from policy_engine.compiler.sections import Sections
from policy_engine.errors import Diagnostic, Severity
from policy_engine.language.contexts import Hook
from policy_engine.language.model import Expression

UNBOUNDED_COMPREHENSION = "unbounded-comprehension"


def warn_unbounded_comprehensions(c: Compilation, sections: Sections) -> None:
    """Report each comprehension over the payload of an event whose schema does not bound
    that list (or map) with ``maxItems`` (``maxProperties``)."""
    events, default_event = sections.events, sections.default_event
    for rule, expression in _event_conditions(sections):
        found = comprehensions_over(expression.source, "event", "payload")
        if not found:
            continue
        names = expression.event_names
        specs = (
            [events.get(name, default_event) for name in sorted(names)]
            if names is not None
            else [*events.values(), default_event]
        )
        for key in dict.fromkeys(key for key, _, _ in found):
            unbounded = sorted({s.name for s in specs if not _bounded(s.schema, key)})
            if not unbounded:
                continue
            target = "event.payload" + (f".{key}" if key else "")
            listed = ", ".join(repr(name) for name in unbounded)
            c.diagnostics.append(
                Diagnostic(
                    expression.location,
                    UNBOUNDED_COMPREHENSION,
                    f"{rule}: a comprehension over {target}, a list the client sends, with "
                    f"no schema bound on its length for event {listed}: the client "
                    "chooses what it costs",
                    f"give the event a schema whose {target.removeprefix('event.payload.')}"
                    " has maxItems"
                    if key
                    else "give the event a schema with maxItems or maxProperties",
                    Severity.WARNING,
                )
            )


def _event_conditions(sections: Sections) -> Iterator[tuple[str, Expression]]:
    """Each condition judged at the event hook, named after its rule."""
    for authz in sections.authorization.rules:
        if authz.hook is Hook.EVENT:
            yield f"authorization rule {authz.name!r}", authz.when
    for limit in sections.rate_limits:
        if limit.hook is Hook.EVENT:
            for expression in (limit.when, limit.key):
                if expression is not None:
                    yield f"rate limit {limit.name!r}", expression
    for shed in sections.shedding:
        if shed.hook is Hook.EVENT:
            yield f"shedding rule {shed.name!r}", shed.when
    for breaker in sections.circuit_breakers:
        yield f"circuit breaker {breaker.name!r}", breaker.match


def _bounded(schema: Mapping[str, Any] | None, key: str) -> bool:
    if schema is None:
        return False
    node: Any = schema
    if key:
        node = (schema.get("properties") or {}).get(key)
        if not isinstance(node, Mapping):
            return False
    return "maxItems" in node or "maxProperties" in node
