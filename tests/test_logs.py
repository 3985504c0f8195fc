from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from policy_engine.algorithms.breaker import Circuit, Reason, Transition
from policy_engine.core.classify import Classification
from policy_engine.core.decision import ALLOW, Decision, Outcome
from policy_engine.errors import Diagnostic, Location, Severity
from policy_engine.language.model import Category, ErrorSeverity
from policy_engine.observe.composite import CompositeObserver
from policy_engine.observe.logs import LogObserver, ProtocolErrorLog, configure_logging
from policy_engine.observe.observer import NullObserver

CONN = {"sid": "sid-1", "ip": "198.51.100.7", "user_id": "ada"}


def refusal(rule: str, code: str = "RATE_LIMITED") -> Decision:
    payload = {"code": code, "retry_after_ms": 1500, "correlation_id": "corr-1"}
    return Decision(Outcome.REJECT, rule, payload)


def classified(code: str, category: Category = Category.SYSTEM) -> Classification:
    return Classification(
        rule="some-rule",
        category=category,
        severity=ErrorSeverity.WARNING,
        code=code,
        message="m",
        retryable=False,
        backoff=None,
        retry_after=None,
        alert=False,
    )


def test_a_refusal_is_one_event_with_its_identifiers() -> None:
    with capture_logs() as logs:
        LogObserver().decision("connect", refusal("rate_limits/connect-per-ip"), 0.0001, CONN)

    assert logs == [
        {
            "event": "decision.refused",
            "log_level": "info",
            "hook": "connect",
            "rule": "rate_limits/connect-per-ip",
            "outcome": "reject",
            "code": "RATE_LIMITED",
            "retry_after_ms": 1500,
            "correlation_id": "corr-1",
            "audit": False,
            "sid": "sid-1",
            "user_id": "ada",
            "ip": "198.51.100.7",
        }
    ]


def test_allowed_and_delayed_decisions_are_not_logged() -> None:
    with capture_logs() as logs:
        observer = LogObserver()
        observer.decision("event", ALLOW, 0.00001, CONN)
        observer.decision("event", Decision(Outcome.DELAY, "shedding/slow", None, 0.05), 0.0, CONN)

    assert logs == []


@pytest.mark.parametrize(
    ("rule", "audit"),
    [
        ("authorization/banned-users", True),
        ("authorization/default", True),
        ("connections/auth_failures", True),
        ("rate_limits/connect-per-ip", False),
        ("shedding/overloaded", False),
    ],
)
def test_security_refusals_are_audit_events(rule: str, audit: bool) -> None:
    with capture_logs() as logs:
        LogObserver().decision("connect", refusal(rule), 0.0, CONN)

    (entry,) = logs
    assert entry["audit"] is audit
    assert entry["log_level"] == ("warning" if audit else "info")


def test_drops_and_disconnects_are_refusals_too() -> None:
    with capture_logs() as logs:
        observer = LogObserver()
        observer.decision("event", Decision(Outcome.DROP, "shedding/telemetry", {}), 0.0, CONN)
        observer.decision(
            "disconnect", Decision(Outcome.DISCONNECT, "shedding/idle", {}), 0.0, CONN
        )

    assert [(e["event"], e["outcome"]) for e in logs] == [
        ("decision.refused", "drop"),
        ("decision.refused", "disconnect"),
    ]


def test_shadow_rules_that_would_have_refused_are_logged() -> None:
    decision = Decision(Outcome.ALLOW, shadowed=("rate_limits/user-actions",))
    with capture_logs() as logs:
        LogObserver().decision("event", decision, 0.0, CONN)

    (entry,) = logs
    assert entry["event"] == "decision.shadowed"
    assert entry["rule"] == "rate_limits/user-actions"
    assert entry["outcome"] == "shadow"
    assert entry["enforced_outcome"] == "allow"
    assert entry["sid"] == "sid-1"


def test_a_classified_error_is_one_event_at_its_severity() -> None:
    error = {"type": "TimeoutError", "message": "agent took too long"}
    with capture_logs() as logs:
        LogObserver().error(
            "event", classified("TIMEOUT"), error, {"correlation_id": "corr-9"}, CONN
        )

    (entry,) = logs
    assert entry["event"] == "error.classified"
    assert entry["log_level"] == "warning"
    assert entry["rule"] == "errors/some-rule"
    assert entry["outcome"] == "error"
    assert entry["code"] == "TIMEOUT"
    assert entry["category"] == "system"
    assert entry["error_type"] == "TimeoutError"
    assert entry["correlation_id"] == "corr-9"
    assert entry["sid"] == "sid-1"
    assert entry["audit"] is False


def test_authentication_errors_are_audit_events() -> None:
    with capture_logs() as logs:
        LogObserver().error("connect", classified("AUTH_FAILED", Category.CONNECTION), {}, {}, CONN)
        LogObserver(is_audit_error=lambda c: c.code == "TOKEN_REPLAYED").error(
            "connect", classified("TOKEN_REPLAYED"), {}, {}, None
        )

    assert [entry["audit"] for entry in logs] == [True, True]
    assert logs[1]["sid"] is None


def test_breaker_transitions_sheds_and_connections_are_logged() -> None:
    with capture_logs() as logs:
        observer = LogObserver()
        observer.breaker_transition(
            "agent", Transition(Circuit.CLOSED, Circuit.OPEN, Reason.FAILURE_RATE, 5.0)
        )
        observer.shed("idle-viewers", "disconnect", 4)
        observer.connection("opened", CONN)
        observer.connection("shed", CONN, "overloaded")

    assert logs[0] == {
        "event": "breaker.transition",
        "log_level": "warning",
        "rule": "circuit_breakers/agent",
        "breaker": "agent",
        "outcome": "open",
        "from_state": "closed",
        "to_state": "open",
        "reason": "failure_rate",
        "audit": False,
    }
    assert logs[1]["event"] == "load.shed"
    assert logs[1]["rule"] == "shedding/idle-viewers"
    assert (logs[1]["outcome"], logs[1]["count"]) == ("disconnect", 4)
    assert [(e["event"], e["log_level"]) for e in logs[2:]] == [
        ("connection.opened", "debug"),
        ("connection.shed", "info"),
    ]


def test_a_failed_reload_logs_every_diagnostic_with_its_location() -> None:
    diagnostics = [
        Diagnostic(Location("p.yaml", 5, 14), "cel-undefined-field", "undefined field 'ipp'"),
        Diagnostic(Location("p.yaml", 9, 3), "unknown-key", "unknown key 'colour'"),
        Diagnostic(Location("p.yaml", 2, 1), "w", "a warning", severity=Severity.WARNING),
    ]
    with capture_logs() as logs:
        LogObserver().reload(False, None, "p.yaml", diagnostics)
        LogObserver().reload(True, "v2", "p.yaml", [])

    failed, succeeded = logs
    assert failed["event"] == "policy.reload_failed"
    assert failed["log_level"] == "error"
    assert failed["outcome"] == "failure"
    assert failed["errors"] == 2
    assert [line.split(": ")[0] for line in failed["diagnostics"]] == [
        "p.yaml:5:14",
        "p.yaml:9:3",
        "p.yaml:2:1",
    ]
    assert (succeeded["event"], succeeded["version"]) == ("policy.reloaded", "v2")


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def decision(self, hook: str, decision: Decision, seconds: float, conn: Any = None) -> None:
        self.calls.append("decision")

    def reload(
        self, ok: bool, version: str | None, path: str, diagnostics: Sequence[Diagnostic]
    ) -> None:
        self.calls.append("reload")

    def shed(self, rule: str, action: str, count: int) -> None:
        self.calls.append("shed")


class Broken(NullObserver):
    def decision(self, hook: str, decision: Decision, seconds: float, conn: Any = None) -> None:
        raise RuntimeError("exporter bug")


def test_composite_fans_out_and_survives_a_failing_observer() -> None:
    first, last = Recorder(), Recorder()
    composite = CompositeObserver(first, Broken(), last)
    with capture_logs() as logs:
        composite.decision("event", ALLOW, 0.0, CONN)
        composite.reload(True, "v", "p.yaml", [])
        composite.shed("x", "reject", 1)
        composite.error("event", classified("X"), {}, {}, None)
        composite.breaker_transition(
            "b", Transition(Circuit.OPEN, Circuit.HALF_OPEN, Reason.OPEN_FOR_ELAPSED, 1.0)
        )
        composite.connection("opened", CONN)
        composite.outbound_drop(CONN, "oh_event", "queue_full")

    assert first.calls == last.calls == ["decision", "reload", "shed"]
    (failure,) = logs
    assert failure["event"] == "observer.failed"
    assert failure["observer"] == "Broken"
    assert failure["method"] == "decision"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_for_structlog_and_standard_library_loggers() -> None:
    stream = io.StringIO()
    assert configure_logging("auto", stream=stream) == "json"

    LogObserver().shed("overloaded", "reject", 2)
    logging.getLogger("uvicorn.error").warning("port %d busy", 8000)
    LogObserver().connection("opened", CONN)  # debug: below the default level

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "load.shed"
    assert first["level"] == "warning"
    assert first["count"] == 2
    assert "timestamp" in first
    assert second["event"] == "port 8000 busy"
    assert second["logger"] == "uvicorn.error"
    assert second["level"] == "warning"


@pytest.mark.usefixtures("restore_logging")
def test_console_lines_at_a_terminal_or_when_asked() -> None:
    terminal = Terminal()
    assert configure_logging("auto", stream=terminal) == "console"
    LogObserver().shed("overloaded", "reject", 2)
    assert "load.shed" in terminal.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(terminal.getvalue().splitlines()[0])

    plain = io.StringIO()
    assert configure_logging("console", stream=plain, level="debug") == "console"
    LogObserver().connection("opened", CONN)
    assert "connection.opened" in plain.getvalue()
    assert "\x1b[" not in plain.getvalue()  # no colours when the stream is not a terminal


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("xml")


class QuietRecorder(Recorder):
    quiet_when_allowed = True


def test_a_plain_allowed_decision_skips_observers_quiet_when_allowed() -> None:
    quiet, loud = QuietRecorder(), Recorder()
    composite = CompositeObserver(quiet, loud)
    composite.decision("event", ALLOW, 0.0, CONN)
    composite.decision("event", ALLOW._replace(shadowed=("rate_limits/x",)), 0.0, CONN)
    composite.decision("event", refusal("rate_limits/x"), 0.0, CONN)

    assert loud.calls == ["decision"] * 3
    assert quiet.calls == ["decision"] * 2  # the shadow hit and the refusal
    assert LogObserver.quiet_when_allowed  # it logs refusals and shadow hits only


class _Lines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


def test_protocol_errors_are_logged_once_per_connection_and_kind_per_interval():
    sink = _Lines()
    log = ProtocolErrorLog(sink, interval=10.0)

    written = [log.report("a", "malformed", "", now) for now in (0.0, 1.0, 2.0, 9.0)]
    other_kind = log.report("a", "bad_attachment", "", 3.0)
    other_connection = log.report("b", "malformed", "", 3.0)
    later = log.report("a", "malformed", "", 11.0)

    assert written == [True, False, False, False]
    assert (other_kind, other_connection, later) == (True, True, True)
    assert [line["count"] for line in sink.lines] == [1, 1, 1, 4]
    assert all(line["event"] == "protocol.error" for line in sink.lines)


def test_the_protocol_error_log_remembers_a_bounded_number_of_pairs():
    log = ProtocolErrorLog(_Lines(), interval=10.0, max_keys=3)

    for n in range(10):
        log.report(f"c{n}", "malformed", "", 0.0)

    assert log.report("c0", "malformed", "", 1.0)  # forgotten, so written again
