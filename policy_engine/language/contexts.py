"""The typed context each hook offers to CEL expressions.

This is the contract between operators and the engine: which variables a rule at a given
place in the policy may read, and the type of every field. The compiler checks expressions
against it (a misspelt field or a variable that the hook does not offer is an error at
validate time), and the runtime builds contexts with every declared field present, so an
expression that passed the checker never meets a missing key.

Numeric fields are integers (milliseconds, megabytes, whole percents) on purpose: CEL does
not compare ``int`` with ``double`` in a checked expression, and operators write
``load.loop_lag_avg_ms > 200``, not ``200.0``. ``load.overloaded`` is a bool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from types import MappingProxyType
from typing import Any

# A field type is one of: string, int, bool, double, dyn, list<T>, map<string,T>.
FieldType = str


@dataclass(frozen=True, slots=True, eq=False)
class MessageType:
    """A record of named, typed fields exposed as one CEL variable.

    Compared by identity: each type is declared once, below, and used as a cache key.
    """

    name: str
    fields: Mapping[str, FieldType]
    doc: str = ""

    def defaults(self) -> dict[str, Any]:
        """A fresh value with every field at its zero value, the base every context starts from.

        Built on the hot path (one per event), so scalars come from a prepared template
        and only container fields get new, unshared objects.
        """
        value = dict(_templates(self))
        for name in _container_fields(self):
            value[name] = zero_value(self.fields[name])
        return value


def zero_value(kind: FieldType) -> Any:
    if kind == "string":
        return ""
    if kind == "int":
        return 0
    if kind == "double":
        return 0.0
    if kind == "bool":
        return False
    if kind.startswith("list<"):
        return []
    if kind.startswith("map<"):
        return {}
    return None


@cache
def _templates(message: MessageType) -> Mapping[str, Any]:
    return {name: zero_value(kind) for name, kind in message.fields.items()}


@cache
def _container_fields(message: MessageType) -> tuple[str, ...]:
    return tuple(n for n, k in message.fields.items() if k.startswith(("list<", "map<")))


def _message(type_name: str, doc: str, /, **fields: FieldType) -> MessageType:
    return MessageType(type_name, MappingProxyType(dict(fields)), doc)


CONN = _message(
    "Conn",
    "The connection: identity, handshake and counters kept by the engine.",
    sid="string",
    namespace="string",
    ip="string",
    user_id="string",
    conversation_id="string",
    transport="string",
    origin="string",
    user_agent="string",
    headers="map<string,string>",
    query="map<string,string>",
    auth_failures="int",
    connected_ms="int",
    priority="int",
)
EVENT = _message(
    "Event",
    "The Socket.IO event being received or emitted.",
    name="string",
    size_bytes="int",
    priority="string",
    has_ack="bool",
    payload="dyn",
)
LOAD = _message(
    "Load",
    "Load signals sampled on a timer, never measured on the request path.",
    active_connections="int",
    loop_lag_ms="int",
    events_per_second="int",
    memory_mb="int",
    cpu_percent="int",
    overloaded_ms="int",
    # Smoothed over the policy's `load.window`, and the hysteresis state built on them.
    connects_per_second="int",
    loop_lag_avg_ms="int",
    events_per_second_avg="int",
    connects_per_second_avg="int",
    overloaded="bool",
)
RAW_ERROR = _message(
    "Error",
    "An exception as the classifier sees it, before classification.",
    type="string",
    types="list<string>",
    module="string",
    message="string",
    status="int",
    code="string",
    hook="string",
)
CLASSIFIED_ERROR = _message(
    "ClassifiedError",
    "An exception after classification, as circuit breakers see it.",
    **RAW_ERROR.fields,  # what the classifier saw, then what it concluded
    category="string",
    severity="string",
    retryable="bool",
    rule="string",
)
CALL = _message(
    "Call",
    "The outcome of one guarded call, as circuit breakers see it.",
    duration_ms="int",
    failed="bool",
    event="string",
)

MESSAGE_TYPES: tuple[MessageType, ...] = (CONN, EVENT, LOAD, RAW_ERROR, CLASSIFIED_ERROR, CALL)

# A variable is either a message type or a plain CEL type such as map<string,dyn>.
Variable = MessageType | FieldType


class Hook(StrEnum):
    CONNECT = "connect"
    EVENT = "event"
    EMIT = "emit"
    DISCONNECT = "disconnect"
    ERROR = "error"


CLAIMS: FieldType = "map<string,dyn>"

HOOK_VARIABLES: Mapping[Hook, Mapping[str, Variable]] = MappingProxyType(
    {
        Hook.CONNECT: MappingProxyType({"conn": CONN, "claims": CLAIMS, "load": LOAD}),
        Hook.EVENT: MappingProxyType(
            {"conn": CONN, "claims": CLAIMS, "event": EVENT, "load": LOAD}
        ),
        Hook.EMIT: MappingProxyType({"conn": CONN, "claims": CLAIMS, "event": EVENT, "load": LOAD}),
        Hook.DISCONNECT: MappingProxyType({"conn": CONN, "claims": CLAIMS, "load": LOAD}),
        Hook.ERROR: MappingProxyType(
            {"conn": CONN, "claims": CLAIMS, "event": EVENT, "error": RAW_ERROR, "hook": "string"}
        ),
    }
)

# Places in the policy whose expressions are not tied to one hook.
BREAKER_MATCH_VARIABLES: Mapping[str, Variable] = HOOK_VARIABLES[Hook.EVENT]
BREAKER_RECORD_VARIABLES: Mapping[str, Variable] = MappingProxyType(
    {"conn": CONN, "event": EVENT, "error": CLASSIFIED_ERROR, "call": CALL}
)
PRIORITY_VARIABLES: Mapping[str, Variable] = MappingProxyType({"conn": CONN, "claims": CLAIMS})
# Disconnect shedding runs on the load sampler's tick, with no connection or event at hand;
# a shedding rule's load gate reads the same.
LOAD_VARIABLES: Mapping[str, Variable] = MappingProxyType({"load": LOAD})
