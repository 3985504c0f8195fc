from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from policy_engine.algorithms.breaker import Circuit, Reason, Transition
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.classify import Classification
from policy_engine.core.decision import ALLOW, Decision, Outcome
from policy_engine.core.engine import Engine, conn_context, event_context
from policy_engine.errors import Diagnostic, Location
from policy_engine.language.model import Category, ErrorSeverity
from policy_engine.observe.metrics import MetricsObserver

TWO_BREAKERS = """\
version: 1
circuit_breakers:
  - name: search
    match: event.name == "search"
    failure_rate: 50%
    window: {calls: 10}
    minimum_calls: 5
    open_for: 10s
  - name: agent
    match: event.name == "oh_user_action"
    failure_rate: 50%
    window: {calls: 10}
    minimum_calls: 5
    open_for: 10s
"""
P = "policy_engine_"


@pytest.fixture
def metrics() -> MetricsObserver:
    return MetricsObserver(CollectorRegistry())


def value(metrics: MetricsObserver, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(P + name, labels)


def conn(sid: str, ip: str = "198.51.100.7", user: str = "ada") -> dict[str, str]:
    return {"sid": sid, "ip": ip, "user_id": user}


def classification(code: str = "TIMEOUT") -> Classification:
    return Classification(
        rule="timeout",
        category=Category.SYSTEM,
        severity=ErrorSeverity.ERROR,
        code=code,
        message="timed out",
        retryable=True,
        backoff=None,
        retry_after=None,
        alert=False,
    )


def test_decisions_are_counted_by_hook_rule_and_outcome(metrics: MetricsObserver) -> None:
    refused = Decision(Outcome.REJECT, "rate_limits/connect-per-ip", {"code": "RATE_LIMITED"})
    metrics.decision("connect", ALLOW, 0.00002, conn("a"))
    metrics.decision("connect", ALLOW, 0.00003, conn("b"))
    metrics.decision("connect", refused, 0.00004, conn("c"))

    assert value(metrics, "decisions_total", hook="connect", rule="none", outcome="allow") == 2
    assert (
        value(
            metrics,
            "decisions_total",
            hook="connect",
            rule="rate_limits/connect-per-ip",
            outcome="reject",
        )
        == 1
    )
    assert value(metrics, "decision_seconds_count", hook="connect") == 3
    assert value(metrics, "decision_seconds_sum", hook="connect") == pytest.approx(0.00009)


def test_no_label_carries_a_connection_user_or_ip(metrics: MetricsObserver) -> None:
    for i in range(50):
        metrics.decision("event", ALLOW, 0.00001, conn(f"sid-{i}", f"10.0.0.{i}", f"user-{i}"))
        metrics.error("event", classification(), {}, {"correlation_id": f"c{i}"}, conn(f"s{i}"))
        metrics.outbound_drop(conn(f"sid-{i}"), "oh_event", "queue_full")
        metrics.connection("opened", conn(f"sid-{i}"))

    label_values = {
        value
        for family in metrics.registry.collect()
        for sample in family.samples
        for name, value in sample.labels.items()
        if name != "le"  # histogram bucket bounds
    }
    per_key = {
        f"{prefix}{i}" for i in range(50) for prefix in ("sid-", "10.0.0.", "user-", "c", "s")
    }
    assert label_values.isdisjoint(per_key)
    assert label_values == {"event", "none", "allow", "TIMEOUT", "system", "queue_full", "opened"}
    assert value(metrics, "decisions_total", hook="event", rule="none", outcome="allow") == 50


def test_shadow_refusals_are_counted_per_rule(metrics: MetricsObserver) -> None:
    shadowed = Decision(Outcome.ALLOW, shadowed=("rate_limits/user-actions",))
    metrics.decision("event", shadowed, 0.0, None)

    assert value(metrics, "shadow_refusals_total", rule="rate_limits/user-actions") == 1


def test_classified_errors_are_counted_by_code_and_category(metrics: MetricsObserver) -> None:
    metrics.error("event", classification("TIMEOUT"), {}, {}, None)
    metrics.error("event", classification("TIMEOUT"), {}, {}, None)

    assert value(metrics, "errors_total", code="TIMEOUT", category="system") == 2


def test_breaker_state_gauge_follows_transitions(metrics: MetricsObserver) -> None:
    metrics.breaker_transition(
        "agent", Transition(Circuit.CLOSED, Circuit.OPEN, Reason.FAILURE_RATE, 1.0)
    )
    assert value(metrics, "circuit_breaker_state", breaker="agent") == 2

    metrics.breaker_transition(
        "agent", Transition(Circuit.OPEN, Circuit.HALF_OPEN, Reason.OPEN_FOR_ELAPSED, 2.0)
    )
    assert value(metrics, "circuit_breaker_state", breaker="agent") == 1
    assert (
        value(
            metrics,
            "circuit_breaker_transitions_total",
            breaker="agent",
            from_state="closed",
            to_state="open",
            reason="failure_rate",
        )
        == 1
    )


def test_installing_a_policy_publishes_its_version_and_breakers(
    metrics: MetricsObserver,
) -> None:
    policy = compile_text(TWO_BREAKERS, "breakers.yaml").policy
    names = [spec.name for spec in policy.circuit_breakers]
    assert names == ["search", "agent"]
    metrics.breaker_transition(
        "gone", Transition(Circuit.CLOSED, Circuit.OPEN, Reason.FAILURE_RATE, 1)
    )
    metrics.breaker_transition(
        names[0], Transition(Circuit.CLOSED, Circuit.OPEN, Reason.FAILURE_RATE, 1)
    )

    metrics.install_policy(policy, "breakers.yaml")

    assert value(metrics, "policy_info", version=policy.version, source="breakers.yaml") == 1
    assert value(metrics, "circuit_breaker_state", breaker="search") == 2  # state carried over
    assert value(metrics, "circuit_breaker_state", breaker="agent") == 0
    assert value(metrics, "circuit_breaker_state", breaker="gone") is None


def test_reloads_are_counted_by_result_and_set_the_version(metrics: MetricsObserver) -> None:
    bad = Diagnostic(Location("p.yaml", 3, 5), "cel-undefined-field", "no such field")
    metrics.reload(False, None, "p.yaml", [bad])
    metrics.reload(True, "abc123", "p.yaml", [])

    assert value(metrics, "policy_reloads_total", result="failure") == 1
    assert value(metrics, "policy_reloads_total", result="success") == 1
    assert value(metrics, "policy_info", version="abc123", source="p.yaml") == 1


def test_sheds_connections_and_drops_are_counted(metrics: MetricsObserver) -> None:
    metrics.shed("shedding/idle-viewers", "disconnect", 3)
    metrics.connection("shed", conn("a"), "overloaded")
    metrics.outbound_drop(conn("a"), "oh_event", "queue_full")

    assert value(metrics, "shed_total", rule="shedding/idle-viewers", action="disconnect") == 3
    assert value(metrics, "connection_events_total", event="shed") == 1
    assert value(metrics, "outbound_drops_total", reason="queue_full") == 1


def test_load_and_connections_are_published(metrics: MetricsObserver) -> None:
    metrics.observe_load(
        {
            "active_connections": 4,
            "loop_lag_ms": 250,
            "events_per_second": 120,
            "memory_mb": 80,
            "cpu_percent": 30,
            "overloaded_ms": 1500,
        }
    )
    assert value(metrics, "loop_lag_seconds") == 0.25
    assert value(metrics, "events_per_second") == 120
    assert value(metrics, "overloaded_seconds") == 1.5
    assert value(metrics, "active_connections") == 4

    open_now = [9]
    metrics.track_connections(lambda: open_now[0])
    open_now[0] = 11
    assert value(metrics, "active_connections") == 11


def test_each_observer_has_its_own_registry() -> None:
    first, second = MetricsObserver(), MetricsObserver()
    first.shed("shedding/x", "reject", 1)

    assert first.registry is not second.registry
    assert value(second, "shed_total", rule="shedding/x", action="reject") is None


def test_render_produces_prometheus_text(metrics: MetricsObserver) -> None:
    metrics.reload(True, "v1", "p.yaml", [])
    body, content_type = metrics.render()

    assert content_type.startswith("text/plain")
    assert b'policy_engine_policy_reloads_total{result="success"} 1.0' in body
    assert b"# TYPE policy_engine_decision_seconds histogram" in body


def test_process_metrics_are_optional() -> None:
    with_process = MetricsObserver(process_metrics=True)
    without = MetricsObserver()

    assert with_process.registry.get_sample_value("process_resident_memory_bytes")
    assert without.registry.get_sample_value("process_resident_memory_bytes") is None


def test_decision_latency_buckets_include_their_upper_bound(metrics: MetricsObserver) -> None:
    allowed = Decision(Outcome.ALLOW)
    for seconds in (0.000005, 0.0000051, 0.2):
        metrics.decision("event", allowed, seconds, None)
    bucket = "decision_seconds_bucket"
    assert value(metrics, bucket, hook="event", le="5e-06") == 1
    assert value(metrics, bucket, hook="event", le="1e-05") == 2
    assert value(metrics, bucket, hook="event", le="0.1") == 2
    assert value(metrics, bucket, hook="event", le="+Inf") == 3


async def test_only_key_label_rules_label_their_refusals_with_the_key(
    metrics: MetricsObserver,
) -> None:
    engine = Engine(
        compile_text(
            """\
version: 1
rate_limits:
  - {name: labelled, hook: event, when: 'event.name == "a"', key: conn.user_id,
     limit: 1/minute, key_label: true}
  - {name: plain, hook: event, when: 'event.name == "b"', key: conn.user_id, limit: 1/minute}
"""
        ).policy
    )
    client = conn_context(sid="s1", ip="192.0.2.1", user_id="ada")
    for name in ("a", "a", "b", "b"):
        decision = await engine.on_event(client, {}, event_context(name))
        metrics.decision("event", decision, 0.00001, client)

    assert value(metrics, "rate_limited_keys_total", rule="rate_limits/labelled", key="ada") == 1
    keys = {
        sample.labels.get("key")
        for family in metrics.registry.collect()
        if family.name == P + "rate_limited_keys"
        for sample in family.samples
    }
    assert keys == {"ada"}  # the plain rule's refusal is counted without its key
    plain = value(
        metrics, "decisions_total", hook="event", rule="rate_limits/plain", outcome="reject"
    )
    assert plain == 1
