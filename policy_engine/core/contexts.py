"""The plain-dict contexts a decision reads (``conn``, ``event``), every declared field set.

The adapter builds them from a live connection, tests and benchmarks by hand; both go
through these functions, so a context never lacks a field a condition may read.
"""

from __future__ import annotations

from typing import Any

from policy_engine.language.contexts import CONN, EVENT


def conn_context(**fields: Any) -> dict[str, Any]:
    """A ``conn`` variable with every declared field present; unknown names are refused."""
    context = CONN.defaults()
    for name, value in fields.items():
        if name not in context:
            raise KeyError(f"conn has no field {name!r}")
        context[name] = value
    return context


def event_context(
    name: str, payload: Any = None, *, size_bytes: int = 0, has_ack: bool = False
) -> dict[str, Any]:
    context = EVENT.defaults()
    context.update(name=name, payload=payload, size_bytes=size_bytes, has_ack=has_ack)
    return context
