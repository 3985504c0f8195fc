"""A CEL source in the policy file turned into a checked, located :class:`Expression`.

The checker's errors point into the expression; the operator needs the file's line and
column, through YAML quotes and block scalars, so the offset is mapped back here. The
static facts the engine uses to skip evaluations (event-name filters, plain field reads,
per-connection values) are taken once, at the same time.
"""

from __future__ import annotations

from collections.abc import Mapping

from policy_engine import cel
from policy_engine.cel.analysis import event_name_filter, field_path
from policy_engine.compiler.compilation import Compilation
from policy_engine.errors import Diagnostic, Location
from policy_engine.language.contexts import Variable
from policy_engine.language.model import Expression

_PER_CONNECTION = frozenset({"conn", "claims"})


def expression(
    c: Compilation,
    source: str,
    pointer: str,
    variables: Mapping[str, Variable],
    *,
    context: str,
    expect: str = "bool",
) -> Expression | None:
    """The checked expression, or None when it does not compile (the problem is reported).

    ``context`` names the place in the policy for the hint that lists its variables.
    """
    try:
        program = c.backend.compile(source, variables, expect=expect)
    except cel.CelCompileError as exc:
        line, column = _position(c, pointer, source, exc.offset)
        location = Location(c.document.path, line, column, pointer)
        available = ", ".join(sorted(variables))
        hint = exc.hint or (
            f"variables available here ({context}): {available}"
            if exc.code == "cel-undeclared"
            else ""
        )
        c.diagnostics.append(Diagnostic(location, exc.code, exc.message, hint))
        return None
    names, rest = event_name_filter(source) if "event" in variables else (None, None)
    residual = None
    if names is not None and rest is not None:
        residual = c.backend.compile(rest, variables, expect=expect)
    return Expression(
        source,
        context,
        program,
        c.document.locate(pointer),
        event_names=names,
        is_name_test=names is not None and rest is None,
        residual=residual,
        path=field_path(source),
        per_connection=program.variables <= _PER_CONNECTION,
    )


def _position(c: Compilation, pointer: str, source: str, offset: int) -> tuple[int, int]:
    """Map an offset inside an expression to the file, through quotes and block scalars."""
    location = c.document.locate(pointer)
    lines = c.document.text.splitlines()
    if not 0 < location.line <= len(lines):
        return location.line, location.column
    marker = lines[location.line - 1][location.column - 1 : location.column]
    before = source[:offset]
    if marker in ("|", ">"):
        line = location.line + 1 + before.count("\n")
        if line > len(lines):
            return location.line, location.column
        indent = len(lines[line - 1]) - len(lines[line - 1].lstrip())
        return line, indent + len(before) - (before.rfind("\n") + 1) + 1
    shift = 1 if marker in ('"', "'") else 0
    return location.line, location.column + shift + offset
