"""``connections``: ceilings, idle timeout, shedding priority, auth-failure delays, outbox,
protocol errors, the admission queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.compiler.expressions import expression
from policy_engine.language.contexts import PRIORITY_VARIABLES
from policy_engine.language.model import (
    AdmissionSpec,
    AuthFailureSpec,
    ConnectionsSpec,
    OutboundSpec,
    OverflowAction,
    ProtocolSpec,
)
from policy_engine.language.units import parse_duration, parse_size

_FIELDS: Mapping[str, Convert] = {
    "max_total": int,
    "max_per_user": int,
    "max_per_ip": int,
    "idle_timeout": parse_duration,
    "retry_after": parse_duration,
}
_AUTH_FAILURES: Mapping[str, Convert] = {
    "threshold": int,
    "window": parse_duration,
    "backoff": str,
    "block_after": int,
    "codes": tuple,
}
_OUTBOUND: Mapping[str, Convert] = {
    "max_queue": int,
    "on_overflow": OverflowAction,
    "disconnect_after_drops": int,
    "max_bytes": parse_size,
}
_QUEUE: Mapping[str, Convert] = {
    "max_wait": parse_duration,
    "max_length": int,
}
_PROTOCOL: Mapping[str, Convert] = {
    "max_errors": int,
    "max_depth": int,
    "answer_unknown_events": bool,
}


def build_connections(
    c: Compilation, raw: Mapping[str, Any] | None, backoff_names: frozenset[str] | None
) -> ConnectionsSpec:
    if raw is None:
        return ConnectionsSpec()
    values = c.read(raw, "/connections", _FIELDS)
    if "priority" in raw:
        values["priority"] = expression(
            c,
            raw["priority"],
            "/connections/priority",
            PRIORITY_VARIABLES,
            context="connections.priority",
            expect="int",
        )
    if "auth_failures" in raw:
        values["auth_failures"] = _auth_failures(c, raw["auth_failures"], backoff_names)
    if "outbound" in raw:
        values["outbound"] = c.record(
            OutboundSpec, raw["outbound"], "/connections/outbound", _OUTBOUND
        )
    if "protocol" in raw:
        values["protocol"] = c.record(
            ProtocolSpec, raw["protocol"], "/connections/protocol", _PROTOCOL
        )
    if "queue" in raw:
        values["queue"] = c.record(AdmissionSpec, raw["queue"], "/connections/queue", _QUEUE)
    return ConnectionsSpec(**values)


def _auth_failures(
    c: Compilation, raw: Mapping[str, Any], backoff_names: frozenset[str] | None
) -> AuthFailureSpec:
    pointer = "/connections/auth_failures"
    spec = c.record(AuthFailureSpec, raw, pointer, _AUTH_FAILURES)
    c.check_backoff_ref(spec.backoff, f"{pointer}/backoff", backoff_names)
    if spec.block_after and spec.block_after <= spec.threshold:
        c.warn(
            f"{pointer}/block_after",
            "no-progressive-delay",
            "block_after is not above threshold: clients are blocked before any delay",
        )
    return spec
