"""PyYAML's parse errors in the operator's terms: where, what, and the likely fix."""

from __future__ import annotations

import yaml

from policy_engine.language.locations import Position


def read_yaml_error(exc: yaml.YAMLError) -> tuple[Position, str]:
    """The position and message of a parser error, with the context it names."""
    position: Position = (0, 0)
    message = str(exc)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            position = (mark.line + 1, mark.column + 1)
        message = exc.problem or exc.context or message
        context = exc.context_mark
        if exc.problem and exc.context and context is not None:
            message += f" ({exc.context} at line {context.line + 1})"
    return position, message


def syntax_hint(message: str, position: Position, text: str) -> str:
    """A hint for the syntax mistakes operators make most: tabs, colons, reserved starts."""
    lines = text.splitlines()
    line = lines[position[0] - 1] if 0 < position[0] <= len(lines) else ""
    if "\t" in line[: len(line) - len(line.lstrip())] or "tab" in message:
        return "YAML does not allow tabs for indentation: indent with spaces"
    if "mapping values are not allowed" in message:
        return "quote a value that contains ': ', or check this line's indentation"
    if "cannot start any token" in message:
        return "quote the value: '@', '`' and '%' cannot start a plain YAML string"
    return ""
