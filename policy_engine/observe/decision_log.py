"""The decision log: one JSON line per sampled decision, for audits and ``replay``.

A :class:`~policy_engine.core.tap.DecisionTap` that writes what a decision was made on
(the hook, the contexts the rules read), what it was (outcome, verdict, rule, correlation
id), under which policy version and when. ``policy-engine replay`` reads these lines back
as :class:`~policy_engine.core.rejudge.Judgement` records (:func:`read_judgements`), so
the format has one home: this module.

Secrets never reach the file: header, query, claim and payload fields whose names say
token, password, secret, authorization, cookie, session or API key are masked, and so are
the fields the policy's ``redact`` names. A rule that reads a masked field sees the mask
when its decision is replayed.

Lines go through a buffer flushed at most once a second (and on :meth:`flush`, which the
server calls on every load sample, and on close); a file is rotated past ``max_bytes``.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from policy_engine.core.decision import Decision
from policy_engine.core.rejudge import DISCONNECT, Judgement, verdict
from policy_engine.language.contexts import Hook
from policy_engine.language.model import DecisionLogSpec, PolicySet

MASK = "***"
STDOUT = "-"
_SECRET = re.compile(
    r"token|passw|secret|authori[sz]ation|cookie|session|api[-_]?key|jwt|credential",
    re.IGNORECASE,
)
_FLUSH_EVERY = 1.0


_secret_names: dict[str, bool] = {}  # answers per field name, bounded


def _is_secret(name: str) -> bool:
    known = _secret_names.get(name)
    if known is None:
        known = _SECRET.search(name) is not None
        if len(_secret_names) < 4096:
            _secret_names[name] = known
    return known


def masked(value: Any) -> Any:
    """``value`` with every field whose name says it is a secret replaced by the mask.

    What holds no secret is returned as it is, not copied: the caller serialises it at
    once and never changes it (:func:`redact` copies the path it masks)."""
    kind = type(value)
    if kind is dict:
        out: Any = None
        for key, item in value.items():
            new = MASK if type(key) is str and _is_secret(key) else masked(item)
            if new is not item:
                if out is None:
                    out = dict(value)
                out[key] = new
        return value if out is None else out
    if kind is list or kind is tuple:
        items = [masked(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, Mapping):
        return masked(dict(value))
    return value


def _masked_conn(conn: Mapping[str, Any]) -> Mapping[str, Any]:
    """``conn`` masked where a client chooses the names: its headers and query."""
    headers, query = conn["headers"], conn["query"]
    seen_headers, seen_query = masked(headers), masked(query)
    if seen_headers is headers and seen_query is query:
        return conn
    return {**conn, "headers": seen_headers, "query": seen_query}


def redact(context: dict[str, Any], paths: Iterable[tuple[str, ...]]) -> None:
    """Mask the value at each dotted path of ``context`` where it exists, copying the
    mappings along the path (the rest may be the live contexts themselves)."""
    for path in paths:
        node: Any = context
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, Mapping):
                node = None
                break
            node[part] = node = dict(child)
        if node is not None and path[-1] in node:
            node[path[-1]] = MASK


class _Sink:
    """An append-only text file rotated past a size, or standard output."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.stream: TextIO = sys.stdout if path == STDOUT else self._open()
        self.size = self.stream.tell() if path != STDOUT else 0

    def _open(self) -> TextIO:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return open(self.path, "a", encoding="utf-8", buffering=1 << 16)

    def write(self, line: str) -> None:
        self.stream.write(line)
        if self.path == STDOUT:
            return
        self.size += len(line)
        if self.size > self.max_bytes:
            self.rotate()

    def rotate(self) -> None:
        """``path`` becomes ``path.1``, ``path.1`` becomes ``path.2``, ... up to ``backups``."""
        self.stream.close()
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{n}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        self.stream = self._open()
        self.size = 0

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.path == STDOUT:
            self.stream.flush()
        else:
            self.stream.close()


class DecisionLog:
    """Writes sampled decisions as the policy in force says; inactive without a section.

    :meth:`configure` follows a reload: another path or rotation reopens the file.
    """

    def __init__(
        self,
        policy: PolicySet,
        *,
        rand: Callable[[], float] = random.random,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._rand = rand
        self._wall_clock = wall_clock
        self._sink: _Sink | None = None
        self._flushed = 0.0
        self.written = 0
        self.spec: DecisionLogSpec | None = None
        self.configure(policy)

    @property
    def active(self) -> bool:
        return self.spec is not None

    def configure(self, policy: PolicySet) -> None:
        spec = policy.decision_log
        self.version = policy.version
        sink = self._sink
        if sink is not None and (
            spec is None or (spec.path, spec.max_bytes, spec.backups) != _placement(sink)
        ):
            sink.close()
            self._sink = sink = None
        self.spec = spec
        if spec is not None:
            self._redact = tuple(tuple(path.split(".")) for path in spec.redact)
            if sink is None:
                self._sink = _Sink(spec.path, spec.max_bytes, spec.backups)

    # -- the tap -----------------------------------------------------------------------------

    def judged(  # noqa: PLR0917 (the tap's signature: positional, one call per decision)
        self,
        hook: Hook,
        conn: Mapping[str, Any],
        claims: Mapping[str, Any],
        event: Mapping[str, Any] | None,
        load: Mapping[str, Any],
        decision: Decision,
    ) -> None:
        spec = self.spec
        if spec is None or (spec.sample < 1.0 and self._rand() >= spec.sample):
            return
        payload = decision.payload or {}
        context: dict[str, Any] = {
            "conn": _masked_conn(conn),
            "claims": masked(claims),
            "load": load,
        }
        if event is not None:
            payload_ = event["payload"]
            seen = masked(payload_)
            context["event"] = event if seen is payload_ else {**event, "payload": seen}
        if self._redact:
            redact(context, self._redact)
        self._write(
            {
                "hook": hook.value,
                "outcome": decision.outcome.value,
                "verdict": verdict(decision),
                "rule": decision.rule,
                "code": payload.get("code"),
                "correlation_id": payload.get("correlation_id"),
                "shadowed": list(decision.shadowed),
                "context": context,
            }
        )

    def disconnected(self, conn: Mapping[str, Any]) -> None:
        """Written whatever the sample: a replay needs it to free the connection's counts."""
        if self.spec is None:
            return
        context = {"conn": {"sid": conn["sid"], "user_id": conn["user_id"], "ip": conn["ip"]}}
        if self._redact:
            redact(context, self._redact)
        self._write({"hook": DISCONNECT, "context": context})

    def _write(self, record: dict[str, Any]) -> None:
        sink = self._sink
        if sink is None:
            return
        now = self._wall_clock()
        line = {
            "ts": round(now, 6),
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "policy_version": self.version,
            **record,
        }
        sink.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
        self.written += 1
        if now - self._flushed >= _FLUSH_EVERY:
            self._flushed = now
            sink.flush()

    def flush(self, *_: Any) -> None:
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def _placement(sink: _Sink) -> tuple[str, int, int]:
    return sink.path, sink.max_bytes, sink.backups


def judgement(record: Mapping[str, Any]) -> Judgement:
    """A logged line as the record ``replay`` judges again."""
    context = record.get("context") or {}
    return Judgement(
        hook=str(record["hook"]),
        at=float(record["ts"]),
        conn=context.get("conn") or {},
        claims=context.get("claims") or {},
        event=context.get("event"),
        load=context.get("load") or {},
        verdict=str(record.get("verdict") or "allow"),
        rule=record.get("rule"),
        correlation_id=record.get("correlation_id"),
    )


def read_judgements(lines: Iterable[str]) -> Iterator[Judgement]:
    """Every decision in ``lines`` (JSON lines), in order; blank lines are skipped.

    Raises ValueError naming the line that is not a decision record.
    """
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield judgement(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: not a decision record ({exc})") from None
