"""The one error hierarchy, in a leaf module so every layer can import it without cycles.

Policy problems are data first (a :class:`Diagnostic` with a stable code and a location) and
exceptions second: the compiler collects every diagnostic of a file before it raises, so an
operator sees all of them in one run instead of fixing one line at a time.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """Where a problem is: the file, a 1-based line and column, and the JSON pointer of the node.

    Line and column are 1-based because every editor and CI annotation format counts that way.
    """

    file: str
    line: int = 0
    column: int = 0
    pointer: str = ""

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column}"
        return self.file


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a policy file."""

    location: Location
    code: str
    message: str
    hint: str = ""
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        text = f"{self.location}: {self.severity.value}: {self.message} [{self.code}]"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.location.file, self.location.line, self.location.column, self.code)


def did_you_mean(word: str, choices: Iterable[str], fallback: str = "") -> str:
    """The hint for a likely typo: the closest known name, or ``fallback`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else fallback


class PolicyEngineError(Exception):
    """Base of everything this package raises on purpose."""


@dataclass(eq=False)
class PolicyError(PolicyEngineError):
    """A policy file could not be loaded or compiled; carries every diagnostic found."""

    diagnostics: tuple[Diagnostic, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.diagnostics) or "invalid policy"

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity is Severity.ERROR)


class UnitError(PolicyEngineError, ValueError):
    """A human unit (duration, rate, size, percentage) that does not parse."""


class EvaluationError(PolicyEngineError):
    """A CEL program failed at evaluation time; the caller applies the policy's failure mode."""


class StoreError(PolicyEngineError):
    """The state store could not answer; the caller applies ``on_store_error``."""
