"""What both CEL engines refuse alike, and the words their refusals use.

A policy that validates with one engine must run with the other, so the bounds, the
result-type rules, the functions both engines know and the wording of a problem (with its
"did you mean" hint) live here once, for the tree walk and both adapters.

The bounds exist because a policy must never stall the event loop (as in Kubernetes' CEL):
a source longer than ``MAX_SOURCE_CHARS``, a tree of more than ``MAX_NODES`` operations or
nested deeper than ``MAX_DEPTH``, and comprehensions whose static cost exceeds
``ITERATION_BUDGET`` are refused; at run time both engines stop after that many
iterations. The budget bounds time, but not always tightly: ``map`` and ``filter`` copy
their result at every step, so their time grows with the square of the list. Over lists a
client controls, prefer ``exists``/``all`` and bound the list's size in the event's schema.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable, Mapping
from functools import cache
from types import ModuleType
from typing import Any, Final

from policy_engine.errors import PolicyEngineError
from policy_engine.language.contexts import MessageType, Variable

MAX_SOURCE_CHARS: Final = 2048
MAX_NODES: Final = 500
MAX_DEPTH: Final = 32
MAX_TREE_DEPTH: Final = 400
ITERATION_BUDGET: Final = 10_000

SYNTAX: Final = "cel-syntax"
UNDEFINED_FIELD: Final = "cel-undefined-field"
UNDECLARED: Final = "cel-undeclared"
TYPE: Final = "cel-type"
RETURN_TYPE: Final = "cel-return-type"
TOO_LONG: Final = "cel-too-long"
TOO_COMPLEX: Final = "cel-too-complex"
BAD_REGEX: Final = "cel-bad-regex"

EXPECTS: Final = frozenset({"bool", "int", "string", "dyn"})
RESULT_TYPES: Final[Mapping[str, type]] = {"bool": bool, "int": int, "string": str}
BUDGET_MESSAGE: Final = f"iteration budget exceeded ({ITERATION_BUDGET} per evaluation)"

MACROS: Final = frozenset({"all", "exists", "exists_one", "map", "filter"})
# Functions and methods both engines provide out of the box, with their result types.
CALL_KINDS: Final[Mapping[str, str | None]] = {
    **dict.fromkeys(("contains", "startsWith", "endsWith", "matches", "bool"), "bool"),
    **dict.fromkeys(("size", "int", "getDate", "getDayOfMonth", "getDayOfWeek"), "int"),
    **dict.fromkeys(("getDayOfYear", "getFullYear", "getHours", "getMilliseconds"), "int"),
    **dict.fromkeys(("getMinutes", "getMonth", "getSeconds"), "int"),
    **{name: name for name in ("uint", "double", "string", "bytes", "type", "duration")},
    "timestamp": "timestamp",
    "dyn": None,
}

_LABELS: Final[Mapping[type, str]] = {
    bool: "bool",
    int: "int",
    float: "double",
    str: "string",
    bytes: "bytes",
    list: "list",
    dict: "map",
    type(None): "null",
}


class CelCompileError(PolicyEngineError):
    """An expression refused at compile time; ``offset`` is 0-based into its source."""

    def __init__(self, code: str, message: str, offset: int = 0, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.offset = offset
        self.hint = hint

    def __repr__(self) -> str:
        return f"CelCompileError({self.code!r}, {self.message!r}, {self.offset}, {self.hint!r})"


def check_request(source: str, expect: str) -> None:
    """Refuse an unknown ``expect`` and a source over the length bound."""
    if expect not in EXPECTS:
        raise ValueError(f"expect must be one of {sorted(EXPECTS)}, not {expect!r}")
    if len(source) > MAX_SOURCE_CHARS:
        raise CelCompileError(
            TOO_LONG,
            f"the expression is {len(source)} characters long; the limit is {MAX_SOURCE_CHARS}",
            MAX_SOURCE_CHARS,
        )


def check_result(expect: str, kind: str) -> None:
    """Refuse a result type the checker proved wrong; ``dyn`` is left to run time."""
    if expect == "dyn" or kind in ("dyn", expect):
        return
    noun = "condition" if expect == "bool" else "value"
    raise CelCompileError(
        RETURN_TYPE, f"this {noun} must be {article(expect)}, but the expression is {article(kind)}"
    )


def runtime_check(expect: str, kind: str) -> type | None:
    """The type every result must be checked against, when the checker could not prove it."""
    if expect in ("dyn", kind):
        return None
    return RESULT_TYPES[expect]


def label(value: Any) -> str:
    """A run-time value's CEL type name, for error messages."""
    return _LABELS.get(type(value), type(value).__name__)


def article(word: str) -> str:
    return f"{'an' if word[:1].lower() in tuple('aeio') else 'a'} {word}"


def undeclared(
    name: str, offset: int, variables: Mapping[str, Variable], *, call: bool
) -> CelCompileError:
    """An unknown name or function, with the closest known one as a hint."""
    if call:
        guess = closest(name, (*CALL_KINDS, *MACROS, "has"))
        hint = f"did you mean `{guess}`?" if guess else ""
        return CelCompileError(UNDECLARED, f"unknown function '{name}'", offset, hint)
    guess = closest(name.split(".", 1)[0], variables)
    hint = (
        f"did you mean `{guess}`?"
        if guess
        else f"this expression can use: {', '.join(sorted(variables))}"
    )
    return CelCompileError(UNDECLARED, f"undeclared reference to '{name}'", offset, hint)


def undefined_field(
    message_type: MessageType,
    name: str,
    offset: int,
    variables: Mapping[str, Variable],
    source: str,
) -> CelCompileError:
    """A field a context message lacks, named through the variable the source used."""
    owners = [n for n, v in variables.items() if v == message_type] or [message_type.name]
    before = source[:offset].rstrip()
    owner = next((n for n in owners if before.endswith(n)), owners[0])
    guess = closest(name, message_type.fields)
    hint = (
        f"did you mean `{owner}.{guess}`?"
        if guess
        else f"`{owner}` has: {', '.join(message_type.fields)}"
    )
    return CelCompileError(UNDEFINED_FIELD, f"`{owner}` has no field '{name}'", offset, hint)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return found[0] if found else None


def container(kind: Variable | None) -> tuple[str, str] | None:
    """``("list", T)`` for ``list<T>``, ``("map", T)`` for ``map<string,T>``, else None."""
    if not isinstance(kind, str) or not kind.endswith(">"):
        return None
    if kind.startswith("list<"):
        return "list", kind[5:-1].strip()
    if kind.startswith("map<"):
        key, _, value = kind[4:-1].partition(",")
        if key.strip() != "string":
            raise ValueError(f"map keys must be strings, not in {kind!r}")
        return "map", value.strip()
    return None


def regex_problem(pattern: str) -> str | None:
    """Why RE2 (the library both engines use) refuses ``pattern``; None when it compiles."""
    re2 = _re2()
    if re2 is None:
        try:
            re.compile(pattern)
        except re.error as exc:
            return str(exc)
        return None
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    return None


@cache
def _re2() -> ModuleType | None:
    try:
        return importlib.import_module("re2")
    except ImportError:
        return None
