"""Reading a policy file into plain data while remembering where every node was written.

Every later stage (schema, compiler, expression checker) reports problems as
``file:line:col``, so positions are recorded here, per JSON pointer, for values and for
the keys that hold them. The file comes from operators and CI, not from attackers, but
a policy loader runs inside a server and may be pointed at anything: input is bounded in
size, depth, node count and alias expansion, and every failure is a :class:`PolicyError`.

The tree is built straight from the parser's event stream (libyaml when available),
without composing a node graph first. That keeps the alias-bomb check ahead of any
expansion, keeps nesting iterative (no recursion to exhaust), and lets duplicate keys be
refused instead of silently overwritten as ``yaml.safe_load`` does.

Scalars resolve as in ``yaml.safe_load`` with three deliberate exceptions, each a value
silently reinterpreted by YAML 1.1: booleans follow YAML 1.2 (only ``true``/``false``,
so ``on``, ``no``, ``y`` stay strings), timestamps stay strings, and sexagesimal numbers
(``1:30``) stay strings. Merge keys (``<<``) are refused: they were dropped from YAML 1.2
and the policy format has its own ``defaults``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NoReturn, Protocol

import yaml

from policy_engine.errors import Diagnostic, Location, PolicyError

Position = tuple[int, int]


class _EventSource(Protocol):
    """What is needed of a PyYAML loader: its event stream (marks included)."""

    def get_event(self) -> yaml.Event | None: ...

    def dispose(self) -> None: ...


# libyaml's loader gives the same events and marks as the pure-Python one, about ten times
# faster; the pure-Python one is the fallback where PyYAML was built without it.
_LOADER: Final[Callable[[str], _EventSource]] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_DIAGNOSTICS: Final = 100
_CORE: Final = "tag:yaml.org,2002:"
_BOM: Final = "\ufeff"


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """Bounds that keep a hostile or broken file from costing more than a normal one."""

    max_bytes: int = 1_048_576
    max_depth: int = 64
    max_nodes: int = 200_000  # every node of the tree, keys included, aliases expanded
    max_aliases: int = 100  # alias expansions, nested ones included


DEFAULT_LIMITS: Final = SourceLimits()


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


def escape_pointer_token(token: str) -> str:
    """RFC 6901: ``~`` and ``/`` inside a key must not read as pointer syntax."""
    return token.replace("~", "~0").replace("/", "~1")


def build_pointer(path: Iterable[str | int]) -> str:
    """The JSON pointer of a path such as jsonschema's ``error.absolute_path``."""
    return "".join(f"/{escape_pointer_token(str(part))}" for part in path)


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
    builder = _TreeBuilder(path, decoded, limits)
    data = builder.build()
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


# --- scalars ---------------------------------------------------------------------------

_INT: Final = re.compile(
    r"[-+]?0b[01_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
)
_FLOAT: Final = re.compile(
    r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?"
    r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_NULLS: Final = frozenset({"", "~", "null", "Null", "NULL"})
_BOOLS: Final = {
    "true": True,
    "True": True,
    "TRUE": True,
    "false": False,
    "False": False,
    "FALSE": False,
}
_NUMBER_START: Final = frozenset("0123456789+-.")


def _to_int(value: str) -> int:
    if _INT.fullmatch(value) is None:
        raise ValueError(value)
    digits = value.replace("_", "")
    sign = -1 if digits[0] == "-" else 1
    digits = digits.lstrip("+-")
    if digits.startswith("0b"):
        return sign * int(digits[2:], 2)
    if digits.startswith("0x"):
        return sign * int(digits[2:], 16)
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits, 8)
    return sign * int(digits)


def _to_float(value: str) -> float:
    if _FLOAT.fullmatch(value) is None:
        raise ValueError(value)
    digits = value.replace("_", "").lower()
    if digits.endswith("inf"):
        return -math.inf if digits[0] == "-" else math.inf
    if digits.endswith("nan"):
        return math.nan
    return float(digits)


def _to_tagged_float(value: str) -> float:
    """``!!float 1`` is 1.0, as in ``yaml.safe_load``."""
    return float(_to_int(value)) if _INT.fullmatch(value) else _to_float(value)


def _to_bool(value: str) -> bool:
    try:
        return _BOOLS[value]
    except KeyError:
        raise ValueError(value) from None


def _to_null(value: str) -> None:
    if value not in _NULLS:
        raise ValueError(value)


def _resolve_plain(value: str) -> Any:
    """Type an untagged plain scalar: YAML 1.1 numbers and nulls, YAML 1.2 booleans."""
    if value[:1] in _NUMBER_START:
        for convert in (_to_int, _to_float):
            try:
                return convert(value)
            except ValueError:
                pass
        return value
    if value in _NULLS:
        return None
    return _BOOLS.get(value, value)


_TAGGED_SCALARS: Final = {
    f"{_CORE}int": _to_int,
    f"{_CORE}float": _to_tagged_float,
    f"{_CORE}bool": _to_bool,
    f"{_CORE}null": _to_null,
}
_MAPPING_TAGS: Final = frozenset({None, "!", f"{_CORE}map"})
_SEQUENCE_TAGS: Final = frozenset({None, "!", f"{_CORE}seq"})


def _show_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a string"


# --- the tree --------------------------------------------------------------------------


class _StoppedError(Exception):
    """Stops the build; the diagnostic is already recorded."""


@dataclass(frozen=True, slots=True)
class _Anchor:
    """An anchored node, with what expanding one alias of it costs."""

    value: Any
    nodes: int
    aliases: int
    height: int
    line: int
    positions: tuple[tuple[str, Position], ...]  # pointer suffixes below the anchor
    key_positions: tuple[tuple[str, Position], ...]


class _Frame:
    """An open mapping or sequence while its children are being read."""

    __slots__ = (
        "aliases_at_start",
        "anchor",
        "container",
        "height",
        "key",
        "key_lines",
        "key_positions_at_start",
        "nodes_at_start",
        "pointer",
        "position",
        "positions_at_start",
        "value_pointer",
    )

    def __init__(self, container: dict[Any, Any] | list[Any], pointer: str | None) -> None:
        self.container = container
        self.pointer = pointer
        self.key: Any = _NO_KEY
        self.value_pointer: str | None = None
        self.key_lines: dict[str, int] = {}
        self.height = 1
        self.anchor: str | None = None
        self.position: Position = (0, 0)
        self.nodes_at_start = 0
        self.aliases_at_start = 0
        self.positions_at_start = 0
        self.key_positions_at_start = 0


_NO_KEY: Final = object()


class _TreeBuilder:
    """Turns the parser's events into plain data and positions, enforcing the limits."""

    def __init__(self, path: str, text: str, limits: SourceLimits) -> None:
        self.path = path
        self.text = text
        self.limits = limits
        self.pointers: list[str] = []
        self.marks: list[Position] = []
        self.key_pointers: list[str] = []
        self.key_marks: list[Position] = []
        self.diagnostics: list[Diagnostic] = []
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Anchor] = {}
        self.open_anchors: set[str] = set()
        self.nodes = 0
        self.aliases = 0
        self.documents = 0
        self.root: Any = _NO_KEY

    def build(self) -> Any:
        with contextlib.suppress(_StoppedError):
            self._consume(_LOADER(self.text))
        if not self.diagnostics and self.root in (_NO_KEY, None):
            self._report(
                (0, 0),
                "empty-file",
                "the policy file is empty",
                hint="a policy is a mapping of sections, starting with 'version: 1'",
            )
        if self.diagnostics:
            self.diagnostics.sort(key=Diagnostic.sort_key)
            raise PolicyError(diagnostics=tuple(self.diagnostics))
        return self.root

    def _consume(self, loader: _EventSource) -> None:
        try:
            while True:
                event = loader.get_event()
                if isinstance(event, yaml.ScalarEvent):
                    self._scalar(event)
                elif isinstance(event, yaml.MappingStartEvent):
                    self._start(event, {})
                elif isinstance(event, yaml.CollectionEndEvent):
                    self._end()
                elif isinstance(event, yaml.SequenceStartEvent):
                    self._start(event, [])
                elif isinstance(event, yaml.AliasEvent):
                    self._alias(event)
                elif isinstance(event, yaml.DocumentStartEvent):
                    self._document(event)
                elif event is None or isinstance(event, yaml.StreamEndEvent):
                    return
        except yaml.YAMLError as exc:
            self._report_yaml_error(exc)
        finally:
            loader.dispose()

    # events

    def _document(self, event: yaml.Event) -> None:
        self.documents += 1
        if self.documents > 1:
            self._stop(
                _position(event),
                "yaml-syntax",
                "expected a single document in the stream",
                hint="a policy file holds one document: remove the second '---'",
            )

    def _scalar(self, event: yaml.ScalarEvent) -> None:
        position = _position(event)
        value = self._scalar_value(event, position)
        if not self.stack:
            self._root_scalar(event, value, position)
            return
        self._count_node(position)
        pointer, is_key = self._slot()
        if pointer is not None:
            self.pointers.append(pointer)
            self.marks.append(position)
        if event.anchor is not None:
            self._define(event.anchor, _Anchor(value, 1, 0, 0, position[0], (), ()), position)
        if is_key and value == "<<" and event.tag is None and event.implicit[0]:
            self._report(
                position,
                "unsupported-merge-key",
                "merge keys ('<<') are not supported",
                self.stack[-1].pointer,
                "write the keys out, or quote '<<' if it is meant as a plain key",
            )
        self._place(value, position, is_key)

    def _scalar_value(self, event: yaml.ScalarEvent, position: Position) -> Any:
        tag = event.tag
        if tag is None:
            return _resolve_plain(event.value) if event.implicit[0] else event.value
        if tag in ("!", f"{_CORE}str"):
            return event.value
        convert = _TAGGED_SCALARS.get(tag)
        if convert is None:
            self._report_tag(tag, "a scalar", position)
            return event.value
        try:
            return convert(event.value)
        except ValueError:
            self._report(
                position,
                "invalid-scalar",
                f"{event.value!r} is not a valid {_show_tag(tag)}",
                hint="remove the tag, or fix the value",
            )
            return event.value

    def _root_scalar(self, event: yaml.ScalarEvent, value: Any, position: Position) -> None:
        if value is None and event.value == "" and event.tag is None and event.anchor is None:
            self.root = None  # "---" alone, or only comments after it
            return
        self._stop_not_a_mapping(_describe(value), position)

    def _start(
        self, event: yaml.MappingStartEvent | yaml.SequenceStartEvent, container: Any
    ) -> None:
        position = _position(event)
        is_mapping = isinstance(container, dict)
        if not self.stack and not is_mapping:
            self._stop_not_a_mapping("a list", position)
        if len(self.stack) >= self.limits.max_depth:
            self._stop(position, "too-deep", self._too_deep_message(), hint="flatten it")
        if event.tag not in (_MAPPING_TAGS if is_mapping else _SEQUENCE_TAGS):
            self._report_tag(event.tag or "", "a mapping" if is_mapping else "a list", position)
        nodes_at_start = self.nodes
        self._count_node(position)
        pointer = self._slot()[0] if self.stack else ""
        frame = _Frame(container, pointer)
        frame.position = position
        frame.anchor = event.anchor
        frame.nodes_at_start = nodes_at_start
        frame.aliases_at_start = self.aliases
        frame.positions_at_start = len(self.pointers)
        frame.key_positions_at_start = len(self.key_pointers)
        if pointer is not None:
            self.pointers.append(pointer)
            self.marks.append(position)
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        self.stack.append(frame)

    def _end(self) -> None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            self.open_anchors.discard(frame.anchor)
            self._define(frame.anchor, self._anchor_of(frame), frame.position)
        if not self.stack:
            self.root = frame.container
            return
        parent = self.stack[-1]
        parent.height = max(parent.height, frame.height + 1)
        self._place(frame.container, frame.position, _expects_key(parent))

    def _alias(self, event: yaml.AliasEvent) -> None:
        position = _position(event)
        name = event.anchor or ""
        anchor = self.anchors.get(name)
        if anchor is None:
            if name in self.open_anchors:
                self._stop(
                    position,
                    "recursive-alias",
                    f"alias '*{name}' is used inside the node it refers to",
                    hint="a policy cannot contain itself",
                )
            self._stop(
                position,
                "yaml-syntax",
                f"found undefined alias '{name}'",
                hint=f"define the anchor '&{name}' before using '*{name}'",
            )
        self._expand(name, anchor, position)
        pointer, is_key = self._slot()
        if pointer is not None:
            self.pointers.append(pointer)
            self.marks.append(position)
            for suffix, mark in anchor.positions:
                self.pointers.append(pointer + suffix)
                self.marks.append(mark)
            for suffix, mark in anchor.key_positions:
                self.key_pointers.append(pointer + suffix)
                self.key_marks.append(mark)
        self.stack[-1].height = max(self.stack[-1].height, anchor.height + 1)
        self._place(_copy_tree(anchor.value), position, is_key)

    # limits

    def _expand(self, name: str, anchor: _Anchor, position: Position) -> None:
        """Charges an alias for everything it will expand to, before anything is copied."""
        limits = self.limits
        self.aliases += 1 + anchor.aliases
        if self.aliases > limits.max_aliases:
            self._stop(
                position,
                "too-many-aliases",
                f"alias '*{name}' brings the document over {limits.max_aliases} alias "
                "expansions (anchors that nest aliases multiply)",
                hint="write the values out instead of nesting aliases",
            )
        self.nodes += anchor.nodes
        if self.nodes > limits.max_nodes:
            self._stop_too_many_nodes(position)
        if len(self.stack) + anchor.height > limits.max_depth:
            self._stop(
                position,
                "too-deep",
                f"alias '*{name}' makes the document nest deeper than {limits.max_depth} levels",
                hint="flatten the structure",
            )

    def _count_node(self, position: Position) -> None:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            self._stop_too_many_nodes(position)

    def _too_deep_message(self) -> str:
        return f"the document nests deeper than {self.limits.max_depth} levels"

    def _stop_too_many_nodes(self, position: Position) -> NoReturn:
        self._stop(
            position,
            "too-many-nodes",
            f"the document has more than {self.limits.max_nodes:,} nodes "
            "(aliases counted expanded)",
            hint="split the policy",
        )

    # placing nodes

    def _slot(self) -> tuple[str | None, bool]:
        """The pointer of the node being read (None if untracked), and whether it is a key."""
        frame = self.stack[-1]
        container = frame.container
        if isinstance(container, list):
            pointer = frame.pointer
            return (None if pointer is None else f"{pointer}/{len(container)}"), False
        if frame.key is _NO_KEY:
            return None, True
        return frame.value_pointer, False

    def _place(self, value: Any, position: Position, is_key: bool) -> None:
        frame = self.stack[-1]
        container = frame.container
        if isinstance(container, list):
            container.append(value)
        elif is_key:
            self._accept_key(frame, value, position)
        else:
            container[frame.key] = value
            frame.key = _NO_KEY

    def _accept_key(self, frame: _Frame, key: Any, position: Position) -> None:
        if not isinstance(key, str):
            self._report(
                position,
                "non-string-key",
                f"mapping keys must be strings, found {_describe(key)}",
                frame.pointer,
                "quote the key",
            )
            frame.key = object()  # keeps reading; the document is refused anyway
            frame.value_pointer = None
            return
        pointer = None if frame.pointer is None else f"{frame.pointer}/{escape_pointer_token(key)}"
        first_line = frame.key_lines.get(key)
        if first_line is not None:
            self._report(
                position,
                "duplicate-key",
                f"duplicate key {key!r} (first defined at line {first_line})",
                pointer,
                "remove one of them: YAML would silently keep only the last",
            )
            frame.key = object()
            frame.value_pointer = None
            return
        frame.key_lines[key] = position[0]
        frame.key = key
        frame.value_pointer = pointer
        if pointer is not None:
            self.key_pointers.append(pointer)
            self.key_marks.append(position)

    # anchors

    def _anchor_of(self, frame: _Frame) -> _Anchor:
        base = len(frame.pointer) if frame.pointer is not None else 0
        start = frame.positions_at_start + 1  # the anchored node itself is the alias's
        positions = tuple(
            (pointer[base:], mark)
            for pointer, mark in zip(self.pointers[start:], self.marks[start:], strict=True)
        )
        key_start = frame.key_positions_at_start
        key_positions = tuple(
            (pointer[base:], mark)
            for pointer, mark in zip(
                self.key_pointers[key_start:], self.key_marks[key_start:], strict=True
            )
        )
        return _Anchor(
            value=frame.container,
            nodes=self.nodes - frame.nodes_at_start,
            aliases=self.aliases - frame.aliases_at_start,
            height=frame.height,
            line=frame.position[0],
            positions=positions if frame.pointer is not None else (),
            key_positions=key_positions if frame.pointer is not None else (),
        )

    def _define(self, name: str, anchor: _Anchor, position: Position) -> None:
        previous = self.anchors.get(name)
        if previous is not None:
            self._report(
                position,
                "yaml-syntax",
                f"found duplicate anchor '{name}' (first defined at line {previous.line})",
                hint="give each anchor its own name",
            )
        self.anchors[name] = anchor

    # diagnostics

    def _report(
        self,
        position: Position,
        code: str,
        message: str,
        pointer: str | None = "",
        hint: str = "",
    ) -> None:
        location = Location(self.path, position[0], position[1], pointer or "")
        self.diagnostics.append(Diagnostic(location, code, message, hint))
        if len(self.diagnostics) >= _MAX_DIAGNOSTICS:
            raise _StoppedError

    def _stop(self, position: Position, code: str, message: str, hint: str = "") -> NoReturn:
        self._report(position, code, message, hint=hint)
        raise _StoppedError

    def _stop_not_a_mapping(self, found: str, position: Position) -> NoReturn:
        self._stop(
            position,
            "not-a-mapping",
            f"the top level of a policy file must be a mapping, found {found}",
            hint="start with 'version: 1' and the policy sections as keys",
        )

    def _report_tag(self, tag: str, node: str, position: Position) -> None:
        self._report(
            position,
            "unsupported-tag",
            f"unsupported tag {_show_tag(tag)!r} on {node}",
            hint="policy files are plain data: remove the tag",
        )

    def _report_yaml_error(self, exc: yaml.YAMLError) -> None:
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
        if "maximum nesting depth" in message:  # libyaml's own bound, hit before ours
            self._report(position, "too-deep", self._too_deep_message(), hint="flatten it")
            return
        self._report(position, "yaml-syntax", message, hint=self._syntax_hint(message, position))

    def _syntax_hint(self, message: str, position: Position) -> str:
        lines = self.text.splitlines()
        line = lines[position[0] - 1] if 0 < position[0] <= len(lines) else ""
        if "\t" in line[: len(line) - len(line.lstrip())] or "tab" in message:
            return "YAML does not allow tabs for indentation: indent with spaces"
        if "mapping values are not allowed" in message:
            return "quote a value that contains ': ', or check this line's indentation"
        if "cannot start any token" in message:
            return "quote the value: '@', '`' and '%' cannot start a plain YAML string"
        return ""


def _position(event: yaml.Event) -> Position:
    mark = event.start_mark
    return (0, 0) if mark is None else (mark.line + 1, mark.column + 1)


def _expects_key(frame: _Frame) -> bool:
    return isinstance(frame.container, dict) and frame.key is _NO_KEY


def _copy_tree(value: Any) -> Any:
    """Each alias gets its own copy, so a consumer editing one place edits only that one."""
    if not isinstance(value, dict | list):
        return value
    root: Any = {} if isinstance(value, dict) else []
    pending: list[tuple[Any, Any]] = [(value, root)]
    while pending:
        source, target = pending.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, child in items:
            copied = child
            if isinstance(child, dict | list):
                copied = {} if isinstance(child, dict) else []
                pending.append((child, copied))
            if isinstance(target, dict):
                target[key] = copied
            else:
                target.append(copied)
    return root
