"""Structured logs: one event per fact, JSON lines in production, readable lines at a terminal.

:func:`configure_logging` sets structlog up and routes the standard library's loggers
(uvicorn, python-socketio, engineio) through the same renderer, so a log pipeline parses
one format. :class:`LogObserver` turns what the engine's edges report into log events: each
refusal, classified error, breaker transition, shed and reload is exactly one event carrying
the identifiers needed to follow it (``correlation_id``, ``sid``, ``rule``, ``outcome``).

Allowed decisions are not logged: they are the hot path and metrics count them. Events an
auditor must find (failed authentication, authorization denials, throttled or blocked
sign-ins) carry ``audit=True``; every other event carries ``audit=False`` so a query on the
field never has to guess.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TextIO

import structlog

from policy_engine.algorithms.breaker import Circuit, Transition
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.errors import Diagnostic, Severity
from policy_engine.language.model import Category

LogFormat = Literal["auto", "json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOGGER_NAME = "policy_engine"
MASK = "***"
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

# Outcomes that refuse something; DELAY lets the event through late and is only counted.
_REFUSALS = frozenset({Outcome.REJECT, Outcome.DROP, Outcome.DISCONNECT})
# Rules whose refusals are security decisions rather than capacity or hygiene.
_AUDIT_RULE_PREFIXES = ("authorization/", "connections/auth_failures")
_AUTH_CODES = frozenset(
    {"AUTH_FAILED", "UNAUTHORIZED", "UNAUTHENTICATED", "FORBIDDEN", "PERMISSION_DENIED"}
)
_SEVERITY_LEVELS = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "error": "error",
    "critical": "critical",
}
# Connection lifecycle events worth an info line; opened/closed are routine: debug only.
_NOTABLE_CONNECTION_EVENTS = frozenset({"idle_closed", "shed", "recovered"})


def configure_logging(
    fmt: str = "auto", *, level: str = "info", stream: TextIO | None = None
) -> LogFormat:
    """Configure structlog and the standard library's root logger; returns the format used.

    ``auto`` picks the console renderer when ``stream`` is a terminal and JSON otherwise, so a
    developer reads aligned lines and a container's log collector gets one object per line.
    """
    out = stream if stream is not None else sys.stderr
    chosen: LogFormat
    if fmt == "auto":
        chosen = "console" if _is_tty(out) else "json"
    elif fmt in ("json", "console"):
        chosen = "json" if fmt == "json" else "console"
    else:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {LOG_FORMATS}")
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer()
        finishing: list[structlog.typing.Processor] = [
            structlog.processors.dict_tracebacks,
            renderer,
        ]
    else:
        # Plain tracebacks: a rich one would print local variables, tokens included.
        renderer = structlog.dev.ConsoleRenderer(
            colors=_is_tty(out), exception_formatter=structlog.dev.plain_traceback
        )
        finishing = [renderer]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *finishing],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Not cached: loggers made before a reconfiguration (tests, embedding apps) follow it.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                *shared,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finishing],
        )
    )
    handler.addFilter(redact_query_strings)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
    for name in _SERVER_LOGGERS:
        # uvicorn's own logging config gives these handlers of their own and stops them
        # propagating; send them to the root handler instead, in the same format.
        server_logger = logging.getLogger(name)
        server_logger.handlers = []
        server_logger.propagate = True
        server_logger.setLevel(logging.NOTSET)
    return chosen


# Engine.IO's own parameters; every other query value may be a credential.
_PLAIN_QUERY_PARAMS = frozenset({"EIO", "transport", "sid", "t", "j", "b64"})
_QUERY = re.compile(r"\?([^\s\"']*)")


def redact_query(text: str) -> str:
    """``text`` with every query value but Engine.IO's own masked (``token=***``)."""

    def masked(match: re.Match[str]) -> str:
        pairs = []
        for pair in match.group(1).split("&"):
            name, sep, value = pair.partition("=")
            plain = name in _PLAIN_QUERY_PARAMS or not value
            pairs.append(f"{name}{sep}{value if plain else MASK}")
        return "?" + "&".join(pairs)

    return _QUERY.sub(masked, text) if "?" in text else text


def redact_query_strings(record: logging.LogRecord) -> bool:
    """A logging filter: the web server logs request paths, query tokens included."""
    if isinstance(record.msg, str):
        record.msg = redact_query(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
    return True


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if isatty is not None else False


def is_auth_error(classification: Classification) -> bool:
    """The default audit test for a classified error: an authentication or permission code."""
    code = classification.code
    return code in _AUTH_CODES or (
        classification.category is Category.CONNECTION and code.startswith("AUTH")
    )


class LogObserver:
    """Writes what the engine's edges report as structured events (see the module docs).

    ``is_audit_error`` decides which classified errors are security events; a server passes
    one that also knows the policy's ``connections.auth_failures.codes``.
    """

    # It writes refusals and shadow-mode hits only: a plain allowed decision need not reach it.
    quiet_when_allowed = True

    def __init__(
        self,
        logger: Any = None,
        *,
        is_audit_error: Callable[[Classification], bool] = is_auth_error,
    ) -> None:
        self._log = logger if logger is not None else structlog.get_logger(LOGGER_NAME)
        self._is_audit_error = is_audit_error

    def decision(
        self,
        hook: str,
        decision: Decision,
        seconds: float,  # noqa: ARG002
        conn: Mapping[str, Any] | None,
    ) -> None:
        outcome = decision.outcome
        if outcome in _REFUSALS:
            rule = decision.rule or ""
            audit = rule.startswith(_AUDIT_RULE_PREFIXES)
            payload = decision.payload or {}
            self._emit(
                "warning" if audit else "info",
                "decision.refused",
                hook=hook,
                rule=rule,
                outcome=outcome.value,
                code=payload.get("code"),
                retry_after_ms=payload.get("retry_after_ms"),
                correlation_id=payload.get("correlation_id"),
                audit=audit,
                **_identity(conn),
            )
        if decision.shadowed:
            audit = any(rule.startswith(_AUDIT_RULE_PREFIXES) for rule in decision.shadowed)
            self._emit(
                "info",
                "decision.shadowed",
                hook=hook,
                rule=decision.shadowed[0],
                rules=list(decision.shadowed),
                outcome="shadow",
                enforced_outcome=outcome.value,
                correlation_id=_correlation_id(decision.payload),
                audit=audit,
                **_identity(conn),
            )

    def error(
        self,
        hook: str,
        classification: Classification,
        error: Mapping[str, Any],
        payload: Mapping[str, Any],
        conn: Mapping[str, Any] | None,
    ) -> None:
        self._emit(
            _SEVERITY_LEVELS.get(classification.severity.value, "error"),
            "error.classified",
            hook=hook,
            rule=f"errors/{classification.rule}",
            outcome="error",
            code=classification.code,
            category=classification.category.value,
            severity=classification.severity.value,
            retryable=classification.retryable,
            alert=classification.alert,
            error_type=error.get("type"),
            error_message=error.get("message"),
            correlation_id=payload.get("correlation_id"),
            audit=self._is_audit_error(classification),
            **_identity(conn),
        )

    def breaker_transition(self, name: str, transition: Transition) -> None:
        self._emit(
            "warning" if transition.to_state is Circuit.OPEN else "info",
            "breaker.transition",
            rule=f"circuit_breakers/{name}",
            breaker=name,
            outcome=transition.to_state.value,
            from_state=transition.from_state.value,
            to_state=transition.to_state.value,
            reason=transition.reason.value,
            audit=False,
        )

    def shed(self, rule: str, action: str, count: int) -> None:
        self._emit(
            "warning",
            "load.shed",
            rule=rule if "/" in rule else f"shedding/{rule}",
            outcome=action,
            count=count,
            audit=False,
        )

    def reload(
        self, ok: bool, version: str | None, path: str, diagnostics: Sequence[Diagnostic]
    ) -> None:
        shown = [str(d) for d in diagnostics]
        if ok:
            self._emit(
                "info",
                "policy.reloaded",
                outcome="success",
                version=version,
                path=path,
                warnings=shown,
                audit=False,
            )
            return
        self._emit(
            "error",
            "policy.reload_failed",
            outcome="failure",
            path=path,
            errors=sum(1 for d in diagnostics if d.severity is Severity.ERROR),
            diagnostics=shown,
            audit=False,
        )

    def connection(self, event: str, conn: Mapping[str, Any], reason: str = "") -> None:
        self._emit(
            "info" if event in _NOTABLE_CONNECTION_EVENTS else "debug",
            f"connection.{event}",
            outcome=event,
            reason=reason,
            audit=False,
            **_identity(conn),
        )

    def outbound_drop(self, conn: Mapping[str, Any], event: str, reason: str) -> None:
        # Debug only: a slow consumer drops many events and metrics already count each.
        self._emit(
            "debug",
            "outbound.dropped",
            outcome="drop",
            event_name=event,
            reason=reason,
            audit=False,
            **_identity(conn),
        )

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        getattr(self._log, level)(event, **fields)


def log_store_availability(available: bool, detail: str) -> None:
    """One event when the shared store stops answering, one when it answers again.

    In between, decisions that need it follow the policy's ``on_store_error``; the count
    of failed calls is in the metrics, not one log line each.
    """
    log = structlog.get_logger(LOGGER_NAME)
    if available:
        log.info("store.recovered", outcome="available", audit=False)
    else:
        log.warning("store.unavailable", outcome="unavailable", error=detail, audit=False)


def _identity(conn: Mapping[str, Any] | None) -> dict[str, Any]:
    if conn is None:
        return {"sid": None, "user_id": None, "ip": None}
    return {"sid": conn.get("sid"), "user_id": conn.get("user_id"), "ip": conn.get("ip")}


def _correlation_id(payload: Mapping[str, Any] | None) -> Any:
    return payload.get("correlation_id") if payload is not None else None


class ProtocolErrorLog:
    """Malformed client packets, logged at most once per connection and kind per interval.

    A hostile client can send thousands of broken packets a second; each is client input,
    not a server fault, so it gets no traceback, and the line written for it carries how
    many of that kind the connection sent since the previous line. At most ``max_keys``
    connection-and-kind pairs are remembered; the oldest are forgotten first.
    """

    def __init__(self, logger: Any = None, *, interval: float = 10.0, max_keys: int = 10_000):
        self._log = logger if logger is not None else structlog.get_logger(LOGGER_NAME)
        self.interval = interval
        self.max_keys = max_keys
        # (connection, kind) -> [when the last line was written, errors since then]
        self._seen: dict[tuple[str, str], list[float]] = {}

    def report(self, connection: str, kind: str, detail: str, now: float) -> bool:
        """Count one error; returns whether a line was written for it."""
        key = (connection, kind)
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        count = 1 + (int(seen[1]) if seen is not None else 0)
        self._seen.pop(key, None)
        if len(self._seen) >= self.max_keys:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = [now, 0]
        self._log.warning(
            "protocol.error",
            outcome="malformed",
            kind=kind,
            eio_sid=connection,
            count=count,
            detail=detail,
            audit=False,
        )
        return True
