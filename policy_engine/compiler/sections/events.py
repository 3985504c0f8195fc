"""``events``: per event name, the payload's size bound, JSON Schema and priority."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import fastjsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from policy_engine.compiler.compilation import Compilation, Convert
from policy_engine.language.model import EventSpec, Priority
from policy_engine.language.units import parse_size

# The entry that applies to every event the section does not name.
ANY_EVENT: Final = "*"

_FIELDS: Mapping[str, Convert] = {"max_bytes": parse_size, "priority": Priority}


def build_events(
    c: Compilation, raw: Mapping[str, Any] | None
) -> tuple[Mapping[str, EventSpec], EventSpec]:
    """The named events, and the spec of every other event."""
    specs: dict[str, EventSpec] = {}
    for name, pointer, body in c.entries(raw, "/events"):
        values = c.read(body, pointer, _FIELDS)
        if "schema" in body:
            relative = body["schema"]
            schema, validate = _event_schema(c, relative, f"{pointer}/schema")
            values.update(schema_path=relative, schema=schema, validate=validate)
        specs[name] = EventSpec(name, **values)
    default = specs.pop(ANY_EVENT, EventSpec(ANY_EVENT))
    return MappingProxyType(specs), default


def _event_schema(c: Compilation, relative: str, pointer: str) -> tuple[Any, Any]:
    """The schema file's content and its compiled validator; (None, None) when unusable."""
    path: Path = (c.base_dir / relative).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        c.error(
            pointer,
            "missing-file",
            f"event schema {relative!r} cannot be read: {exc.strerror or exc}",
            f"paths are relative to the policy file's folder ({c.base_dir})",
        )
        return None, None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        c.error(
            pointer,
            "bad-event-schema",
            f"event schema {relative!r} is not JSON: {exc.msg} at line {exc.lineno}",
        )
        return None, None
    try:
        Draft202012Validator.check_schema(schema)
        validate = fastjsonschema.compile(schema)
    except (SchemaError, fastjsonschema.JsonSchemaDefinitionException) as exc:
        message = getattr(exc, "message", str(exc))
        c.error(
            pointer,
            "bad-event-schema",
            f"event schema {relative!r} is not a valid JSON Schema: {message}",
        )
        return None, None
    c.event_schemas[relative] = schema
    return MappingProxyType(schema) if isinstance(schema, dict) else schema, validate
