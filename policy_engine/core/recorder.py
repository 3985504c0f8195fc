"""What a decision visited, told as it goes: the evaluator's tracer, passed in.

A decision takes a :class:`Recorder` and tells it every rule it looks at. On the request
path that is :data:`NULL_RECORDER`, which keeps nothing; ``explain`` and policy tests pass
a :class:`TraceRecorder` to the very same code, so an explanation is the trace of the
decision the server makes, never a second evaluation that could disagree with it.
Detail that costs something to build is built only when ``enabled`` says it is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from policy_engine.core.decision import TraceEntry

_NO_DETAIL: Mapping[str, Any] = {}


class Recorder(Protocol):
    enabled: bool

    def note(
        self,
        section: str,
        rule: str,
        matched: bool,
        outcome: str,
        detail: Mapping[str, Any] = _NO_DETAIL,
    ) -> None: ...

    def entries(self) -> tuple[TraceEntry, ...]: ...


class NullRecorder:
    """Keeps nothing: the request path's recorder."""

    enabled = False

    def note(self, *_: Any) -> None:
        return None

    def entries(self) -> tuple[TraceEntry, ...]:
        return ()


NULL_RECORDER = NullRecorder()


class TraceRecorder:
    """Keeps every rule visited, in order, for ``Decision.trace``."""

    enabled = True

    def __init__(self) -> None:
        self._entries: list[TraceEntry] = []

    def note(
        self,
        section: str,
        rule: str,
        matched: bool,
        outcome: str,
        detail: Mapping[str, Any] = _NO_DETAIL,
    ) -> None:
        self._entries.append(TraceEntry(section, rule, matched, outcome, dict(detail)))

    def entries(self) -> tuple[TraceEntry, ...]:
        return tuple(self._entries)
