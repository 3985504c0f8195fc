"""One compilation's shared state: the document, what the schema let through, the problems.

Every section builder reads the file through this object, so they all report the same way
(located, collected, never raised), read only the parts of the file the schema passed,
and take a value the file leaves out from the model's defaults rather than their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from policy_engine.cel import CelBackend
from policy_engine.errors import Diagnostic, Severity, UnitError, did_you_mean
from policy_engine.language.locations import escape_pointer_token
from policy_engine.language.schema import SchemaCheck
from policy_engine.language.source import SourceDocument

T = TypeVar("T")

Convert = Callable[[Any], Any]
"""Turns a schema-valid YAML value into a model field's value; may raise UnitError."""


@dataclass
class Compilation:
    """The document, where relative paths resolve, and what went wrong so far."""

    document: SourceDocument
    base_dir: Path
    backend: CelBackend
    schema: SchemaCheck
    diagnostics: list[Diagnostic] = field(default_factory=list)
    rule_names: dict[str, str] = field(default_factory=dict)
    event_schemas: dict[str, Any] = field(default_factory=dict)

    # -- reporting -------------------------------------------------------------------------

    def error(
        self, pointer: str, code: str, message: str, hint: str = "", *, key: bool = False
    ) -> None:
        location = self.document.locate(pointer, key=key)
        self.diagnostics.append(Diagnostic(location, code, message, hint))

    def warn(self, pointer: str, code: str, message: str, hint: str = "") -> None:
        location = self.document.locate(pointer)
        self.diagnostics.append(Diagnostic(location, code, message, hint, Severity.WARNING))

    @property
    def failed(self) -> bool:
        return any(d.severity is Severity.ERROR for d in self.diagnostics)

    def report(self) -> tuple[Diagnostic, ...]:
        """Every diagnostic once, in file order."""
        return tuple(sorted(dict.fromkeys(self.diagnostics), key=Diagnostic.sort_key))

    # -- reading the file ------------------------------------------------------------------

    def section(self, name: str) -> Mapping[str, Any] | None:
        """A mapping section as written ({} when absent), or None when the schema refused it."""
        if not self.schema.intact(f"/{name}"):
            return None
        value: Mapping[str, Any] = self.document.data.get(name, {})
        return value

    def items(self, raw: Any, pointer: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """The schema-valid rules of a list, each with its pointer; none if the list is not one."""
        if raw is None or not self.schema.sound(pointer):
            return
        for index, body in enumerate(raw):
            item = f"{pointer}/{index}"
            if self.schema.intact(item):
                yield item, body

    def rules(
        self, raw: Any, pointer: str, section: str
    ) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
        """The schema-valid rules of a list as (pointer, name, body), each name claimed."""
        for item, body in self.items(raw, pointer):
            name: str = body["name"]
            self.claim_name(name, f"{item}/name", section)
            yield item, name, body

    def entries(self, raw: Any, pointer: str) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
        """The schema-valid entries of a mapping by name: (name, pointer, body)."""
        if raw is None or not self.schema.sound(pointer):
            return
        for name, body in raw.items():
            item = f"{pointer}/{escape_pointer_token(name)}"
            if self.schema.intact(item):
                yield name, item, body

    def read(
        self, body: Mapping[str, Any], pointer: str, converters: Mapping[str, Convert]
    ) -> dict[str, Any]:
        """The fields ``body`` sets, converted; those it leaves out keep the model's default."""
        values: dict[str, Any] = {}
        for key, convert in converters.items():
            if key in body:
                try:
                    values[key] = convert(body[key])
                except UnitError as exc:
                    self.error(f"{pointer}/{key}", "unit", str(exc))
        return values

    def record(
        self,
        kind: type[T],
        raw: Mapping[str, Any] | None,
        pointer: str,
        converters: Mapping[str, Convert],
    ) -> T:
        """A record with the fields ``raw`` sets; all defaults when the schema refused ``raw``."""
        return kind() if raw is None else kind(**self.read(raw, pointer, converters))

    def unit(self, parse: Callable[[Any], T], value: Any, pointer: str) -> T | None:
        """A required unit value, or None (reported) when it does not parse."""
        try:
            return parse(value)
        except UnitError as exc:
            self.error(pointer, "unit", str(exc))
            return None

    # -- names and references --------------------------------------------------------------

    def claim_name(self, name: str, pointer: str, section: str) -> None:
        previous = self.rule_names.get(name)
        if previous is not None:
            self.error(
                pointer,
                "duplicate-name",
                f"rule name {name!r} is already used by {previous}",
                "rule names identify state across reloads and in metrics: make each unique",
            )
            return
        line = self.document.locate(pointer).line
        self.rule_names[name] = f"{section} (line {line})"

    def check_backoff_ref(self, name: str, pointer: str, known: frozenset[str] | None) -> None:
        """``known`` is None when the backoff section itself is broken: nothing to check against."""
        if known is not None and name not in known:
            self.error(
                pointer,
                "unknown-backoff",
                f"backoff policy {name!r} is not defined",
                did_you_mean(name, sorted(known), "define it under `backoff:`"),
            )

    def line_of(self, pointer: str) -> int:
        return self.document.locate(pointer).line


def is_catch_all(source: str) -> bool:
    """A condition written to match everything, after which later rules are unreachable."""
    return source.strip() == "true"


def default_of(record: type, name: str) -> Any:
    """The model's default for one field of ``record``, for checks made before it is built."""
    return _defaults(record)[name]


@cache
def _defaults(record: type) -> Mapping[str, Any]:
    return {f.name: f.default for f in fields(record)}
