"""Reading a policy file into plain data while remembering where every node was written.

Every later stage (schema, compiler, expression checker) reports problems as
``file:line:col``, so positions are recorded here, per JSON pointer, for values and for
the keys that hold them. The file comes from operators and CI, not from attackers, but
a policy loader runs inside a server and may be pointed at anything: input is bounded in
size, depth, node count and alias expansion, and every failure is a :class:`PolicyError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import yaml

from policy_engine.errors import Diagnostic, Location, PolicyError
from policy_engine.language.locations import Position, build_pointer, escape_pointer_token
from policy_engine.language.yaml_tree import DEFAULT_LIMITS, EventSource, SourceLimits, TreeBuilder

__all__ = [
    "DEFAULT_LIMITS",
    "Position",
    "SourceDocument",
    "SourceLimits",
    "build_pointer",
    "escape_pointer_token",
    "load_source",
    "parse_source",
]

# libyaml's loader gives the same events and marks as the pure-Python one, far faster; the
# pure-Python one is the fallback where PyYAML was built without it.
_LOADER: Final[Callable[[str], EventSource]] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BOM: Final = "\ufeff"


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """A policy file as plain data, plus where each value and key was written."""

    path: str
    text: str
    data: Any
    positions: Mapping[str, Position]
    key_positions: Mapping[str, Position]

    def locate(self, pointer: str, *, key: bool = False) -> Location:
        """Where to report a problem at ``pointer``, even for a node that does not exist.

        A missing property or a pointer into a rejected value falls back to the nearest
        ancestor that was written in the file, so every diagnostic gets a line.
        """
        if key and (found := self.key_positions.get(pointer)) is not None:
            return Location(self.path, found[0], found[1], pointer)
        current = pointer
        while (found := self.positions.get(current)) is None:
            if not current:
                return Location(self.path, 0, 0, pointer)
            cut = current.rfind("/")
            current = current[:cut] if cut > 0 else ""
        return Location(self.path, found[0], found[1], pointer)


def load_source(
    path: str | os.PathLike[str], *, limits: SourceLimits = DEFAULT_LIMITS
) -> SourceDocument:
    """Read and parse a policy file; never reads more than ``max_bytes + 1`` bytes."""
    shown = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise _fail(shown, "io-error", "policy file not found") from None
    except IsADirectoryError:
        raise _fail(shown, "io-error", "this is a directory, not a policy file") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise _fail(shown, "io-error", f"cannot read the policy file: {reason}") from None
    return parse_source(data, shown, limits=limits)


def parse_source(
    text: str | bytes, path: str = "<string>", *, limits: SourceLimits = DEFAULT_LIMITS
) -> SourceDocument:
    """Parse a policy document; every refusal is a :class:`PolicyError` with a location.

    Diagnostic codes, stable for tooling: ``file-too-large``, ``not-utf8``, ``empty-file``,
    ``yaml-syntax``, ``not-a-mapping``, ``duplicate-key``, ``non-string-key``,
    ``unsupported-tag``, ``invalid-scalar``, ``unsupported-merge-key``, ``recursive-alias``,
    ``too-deep``, ``too-many-nodes``, ``too-many-aliases`` (and ``io-error`` from
    :func:`load_source`). Problems that leave the rest readable (duplicate keys, bad keys
    and tags) are all reported together; the others stop at the first.
    """
    decoded = _decode(text, path, limits)
    _refuse_forbidden_characters(decoded, path)
    builder = TreeBuilder(path, decoded, limits)
    data = builder.build(_LOADER)
    return SourceDocument(
        path=path,
        text=decoded,
        data=data,
        positions=MappingProxyType(dict(zip(builder.pointers, builder.marks, strict=True))),
        key_positions=MappingProxyType(
            dict(zip(builder.key_pointers, builder.key_marks, strict=True))
        ),
    )


# --- input checks ----------------------------------------------------------------------

_FORBIDDEN: Final = re.compile(
    "[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _fail(
    path: str, code: str, message: str, position: Position = (0, 0), hint: str = ""
) -> PolicyError:
    location = Location(path, position[0], position[1])
    return PolicyError(diagnostics=(Diagnostic(location, code, message, hint),))


def _decode(text: str | bytes, path: str, limits: SourceLimits) -> str:
    size = len(text)
    if isinstance(text, str) and size <= limits.max_bytes:
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise _fail(
            path,
            "file-too-large",
            f"the policy file is over the size limit of {limits.max_bytes:,} bytes",
            hint="split the policy, or raise SourceLimits.max_bytes if this size is intended",
        )
    if isinstance(text, str):
        return text.removeprefix(_BOM)
    try:
        return text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        prefix = text[: exc.start].decode("utf-8-sig")
        raise _fail(
            path,
            "not-utf8",
            f"the file is not valid UTF-8: invalid byte 0x{text[exc.start]:02x}",
            _end_position(prefix),
            "save the policy file as UTF-8",
        ) from None


def _end_position(prefix: str) -> Position:
    """The 1-based position just after ``prefix``, counting line breaks as YAML does."""
    lines = prefix.splitlines(keepends=True)
    if not lines:
        return (1, 1)
    last = lines[-1]
    if last.splitlines()[0] != last:  # ends with a line break
        return (len(lines) + 1, 1)
    return (len(lines), len(last) + 1)


def _refuse_forbidden_characters(text: str, path: str) -> None:
    """Checked here so the position is exact; the parsers report these without a line."""
    found = _FORBIDDEN.search(text)
    if found is None:
        return
    char = found.group()
    raise _fail(
        path,
        "yaml-syntax",
        f"character U+{ord(char):04X} is not allowed in a YAML file",
        _end_position(text[: found.start()]),
        "remove it, or write it as an escape inside a double-quoted string",
    )
