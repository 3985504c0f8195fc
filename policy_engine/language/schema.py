"""The policy file's JSON Schema, and its errors turned into located, hinted diagnostics.

`schemas/policy.schema.json` is the single source of truth for the structure; this module
only finds it (in the installed wheel or beside the source tree), validates a document
against it and explains what went wrong in the operator's terms: which line, which key,
and what was probably meant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from policy_engine.errors import Diagnostic, did_you_mean
from policy_engine.language.locations import build_pointer
from policy_engine.language.source import SourceDocument

SCHEMA_FILE = "policy.schema.json"


def schema_path() -> Path:
    """The schema shipped in the wheel, or the repository's copy when running from source."""
    packaged = resources.files("policy_engine").joinpath("_schemas", SCHEMA_FILE)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "schemas" / SCHEMA_FILE


@cache
def policy_schema() -> Mapping[str, Any]:
    with schema_path().open(encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(policy_schema())


@dataclass(frozen=True, slots=True)
class SchemaCheck:
    """What the schema found: every violation, and which nodes they make untrustworthy.

    Later stages still read the parts of a broken file that are themselves valid, so one
    misspelt key does not hide the expression errors of every other rule.
    """

    diagnostics: tuple[Diagnostic, ...]
    broken: frozenset[str]  # the JSON pointer of each node that failed a schema rule
    tainted: frozenset[str]  # those nodes and every node above them

    def intact(self, pointer: str) -> bool:
        """Whether the node at ``pointer`` and everything under it passed the schema."""
        return pointer not in self.tainted

    def sound(self, pointer: str) -> bool:
        """Whether the node itself passed (its children may not): its items can be read."""
        return pointer not in self.broken


def check_document(document: SourceDocument) -> SchemaCheck:
    """Every schema violation of the document, each placed on the line it is about."""
    diagnostics: list[Diagnostic] = []
    broken: set[str] = set()
    for error in _validator().iter_errors(document.data):
        broken.add(build_pointer(error.absolute_path))
        diagnostics.extend(_explain(error, document))
    return SchemaCheck(tuple(diagnostics), frozenset(broken), _with_ancestors(broken))


def _with_ancestors(pointers: set[str]) -> frozenset[str]:
    found = {""} if pointers else set()
    for pointer in pointers:
        cut = len(pointer)
        while cut > 0:
            found.add(pointer[:cut])
            cut = pointer.rfind("/", 0, cut)
    return frozenset(found)


def _explain(error: ValidationError, document: SourceDocument) -> Iterator[Diagnostic]:
    pointer = build_pointer(error.absolute_path)
    keyword = error.validator
    if keyword == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(_schema_of(error).get("properties", {}))
        for key in error.instance:
            if key in allowed:
                continue
            yield Diagnostic(
                document.locate(build_pointer([*error.absolute_path, key]), key=True),
                "schema-unknown-key",
                f"unknown key {key!r}" + (f" in {pointer}" if pointer else ""),
                did_you_mean(str(key), allowed, "allowed keys: " + ", ".join(allowed)),
            )
        return
    if keyword == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else error.message
        yield Diagnostic(
            document.locate(pointer, key=True),
            "schema-missing-key",
            f"missing required key {missing!r}" + (f" in {pointer}" if pointer else ""),
        )
        return
    if keyword in ("oneOf", "anyOf") and error.context:
        best = min(error.context, key=lambda e: len(list(e.schema_path)))
        yield from _explain(best, document)
        return
    yield Diagnostic(
        document.locate(pointer),
        f"schema-{_kebab(str(keyword))}",
        _message(error, pointer),
        _hint(error),
    )


def _message(error: ValidationError, pointer: str) -> str:
    where = pointer or "the document"
    keyword = error.validator
    if keyword == "maxLength":
        return f"{where}: longer than {_expected(error)} characters"
    if keyword == "maxProperties" and _expected(error) == 1:
        instance: Any = error.instance
        return f"{where}: set only one of {', '.join(sorted(instance))}"
    if keyword == "enum":
        choices = ", ".join(repr(c) for c in _expected(error))
        return f"{where}: {error.instance!r} is not one of {choices}"
    if keyword == "const":
        return f"{where}: must be {_expected(error)!r}, got {error.instance!r}"
    if keyword == "pattern":
        description = _schema_of(error).get("description", "")
        return f"{where}: {_short(error.instance)} is not valid" + (
            f" ({description})" if description else ""
        )
    if keyword == "type":
        return f"{where}: expected {_expected(error)}, got {_type_name(error.instance)}"
    return f"{where}: {error.message}"


def _hint(error: ValidationError) -> str:
    if error.validator == "enum" and isinstance(error.instance, str):
        return did_you_mean(error.instance, [str(c) for c in _expected(error)], "")
    examples = _schema_of(error).get("examples")
    if examples and error.validator in ("pattern", "type", "const"):
        return "for example: " + ", ".join(json.dumps(e) for e in examples[:3])
    return ""


def _schema_of(error: ValidationError) -> Mapping[str, Any]:
    schema = error.schema
    return schema if isinstance(schema, Mapping) else {}


def _expected(error: ValidationError) -> Any:
    """The schema keyword's value (an enum's choices, a const, a limit)."""
    return error.validator_value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {value!r}"
    return names.get(type(value), type(value).__name__)


def _kebab(text: str) -> str:
    return "".join("-" + c.lower() if c.isupper() else c for c in text)
