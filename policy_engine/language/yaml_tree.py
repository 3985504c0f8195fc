"""The parser's event stream turned into plain data and the position of every node.

The tree is built straight from the events (libyaml's when available), without composing
a node graph first. That keeps the alias-bomb check ahead of any expansion, keeps nesting
iterative (no recursion to exhaust), and lets duplicate keys be refused instead of
silently overwritten as ``yaml.safe_load`` does. Merge keys (``<<``) are refused: they
were dropped from YAML 1.2 and the policy format has its own ``defaults``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol

import yaml

from policy_engine.errors import Diagnostic, Location, PolicyError
from policy_engine.language.locations import Position, escape_pointer_token
from policy_engine.language.yaml_errors import read_yaml_error, syntax_hint
from policy_engine.language.yaml_scalars import (
    CORE_TAG,
    MAPPING_TAGS,
    SEQUENCE_TAGS,
    TAGGED_SCALARS,
    describe,
    resolve_plain,
    show_tag,
)

_MAX_DIAGNOSTICS: Final = 100


class EventSource(Protocol):
    """What is needed of a PyYAML loader: its event stream (marks included)."""

    def get_event(self) -> yaml.Event | None: ...

    def dispose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """Bounds that keep a hostile or broken file from costing more than a normal one."""

    max_bytes: int = 1_048_576
    max_depth: int = 64
    max_nodes: int = 200_000  # every node of the tree, keys included, aliases expanded
    max_aliases: int = 100  # alias expansions, nested ones included


DEFAULT_LIMITS: Final = SourceLimits()


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


_NO_KEY: Final = object()


@dataclass(slots=True, eq=False)
class _Frame:
    """An open mapping or sequence while its children are being read."""

    container: dict[Any, Any] | list[Any]
    pointer: str | None
    position: Position
    anchor: str | None
    # What the document held when the frame opened: an anchor's cost is the difference.
    nodes_at_start: int
    aliases_at_start: int
    positions_at_start: int
    key_positions_at_start: int
    key: Any = _NO_KEY
    value_pointer: str | None = None
    key_lines: dict[str, int] = field(default_factory=dict)
    height: int = 1


class TreeBuilder:
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

    def build(self, loader: Callable[[str], EventSource]) -> Any:
        """The document's data; ``loader`` is the PyYAML loader class whose events it reads."""
        with contextlib.suppress(_StoppedError):
            self._consume(loader(self.text))
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

    def _consume(self, events: EventSource) -> None:
        try:
            while True:
                event = events.get_event()
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
            events.dispose()

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
            return resolve_plain(event.value) if event.implicit[0] else event.value
        if tag in ("!", f"{CORE_TAG}str"):
            return event.value
        convert = TAGGED_SCALARS.get(tag)
        if convert is None:
            self._report_tag(tag, "a scalar", position)
            return event.value
        try:
            return convert(event.value)
        except ValueError:
            self._report(
                position,
                "invalid-scalar",
                f"{event.value!r} is not a valid {show_tag(tag)}",
                hint="remove the tag, or fix the value",
            )
            return event.value

    def _root_scalar(self, event: yaml.ScalarEvent, value: Any, position: Position) -> None:
        if value is None and event.value == "" and event.tag is None and event.anchor is None:
            self.root = None  # "---" alone, or only comments after it
            return
        self._stop_not_a_mapping(describe(value), position)

    def _start(
        self, event: yaml.MappingStartEvent | yaml.SequenceStartEvent, container: Any
    ) -> None:
        position = _position(event)
        is_mapping = isinstance(container, dict)
        if not self.stack and not is_mapping:
            self._stop_not_a_mapping("a list", position)
        if len(self.stack) >= self.limits.max_depth:
            self._stop(position, "too-deep", self._too_deep_message(), hint="flatten it")
        if event.tag not in (MAPPING_TAGS if is_mapping else SEQUENCE_TAGS):
            self._report_tag(event.tag or "", "a mapping" if is_mapping else "a list", position)
        nodes_at_start = self.nodes
        self._count_node(position)
        pointer = self._slot()[0] if self.stack else ""
        frame = _Frame(
            container,
            pointer,
            position,
            event.anchor,
            nodes_at_start,
            self.aliases,
            len(self.pointers),
            len(self.key_pointers),
        )
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
                f"mapping keys must be strings, found {describe(key)}",
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
            f"unsupported tag {show_tag(tag)!r} on {node}",
            hint="policy files are plain data: remove the tag",
        )

    def _report_yaml_error(self, exc: yaml.YAMLError) -> None:
        position, message = read_yaml_error(exc)
        if "maximum nesting depth" in message:  # libyaml's own bound, hit before ours
            self._report(position, "too-deep", self._too_deep_message(), hint="flatten it")
            return
        hint = syntax_hint(message, position, self.text)
        self._report(position, "yaml-syntax", message, hint=hint)


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
