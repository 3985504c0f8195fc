"""Prometheus metrics for the engine's edges, as an observer (:mod:`.observe.observer`).

Every label takes its values from a bounded set: hook names, rule names (``section/name``,
fixed by the policy file), outcomes, error codes and categories, breaker names, reload
results. Nothing is labelled by connection, user, IP or conversation: per-key labels are how
rate-limit exporters blow up their time-series databases.

Each instance owns a :class:`~prometheus_client.CollectorRegistry` (one per server), so two
servers in one process, or two tests, never register the same name twice.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from policy_engine.algorithms.breaker import Circuit, Transition
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision
from policy_engine.errors import Diagnostic
from policy_engine.language.model import PolicySet
from policy_engine.state.health import StoreHealth

NAMESPACE = "policy_engine"
NO_RULE = "none"
BREAKER_STATE_VALUES: Mapping[Circuit, int] = {
    Circuit.CLOSED: 0,
    Circuit.HALF_OPEN: 1,
    Circuit.OPEN: 2,
}
# A decision takes microseconds; the buckets resolve 5 us to 100 ms.
DECISION_BUCKETS = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
)


# The ``le`` labels, formatted as prometheus_client formats its own histograms' bounds.
_BUCKET_LABELS = (*(floatToGoString(b) for b in DECISION_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class DecisionTally:
    """Decision counts and latencies, kept as plain numbers and exported at scrape time.

    This is the one metric touched on every event, where a Prometheus ``Counter.inc`` and a
    ``Histogram.observe`` each take a lock. Decisions are made on the event loop, so plain
    dict and list updates are enough;
    the exported series are the same ``policy_engine_decisions_total`` counter and
    ``policy_engine_decision_seconds`` histogram.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        # Per hook: one count per bucket (the last for +Inf) and the sum of seconds.
        self.latencies: dict[str, tuple[list[int], list[float]]] = {}

    def add(self, hook: str, rule: str, outcome: str, seconds: float) -> None:
        key = (hook, rule, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        latency = self.latencies.get(hook)
        if latency is None:
            latency = self.latencies[hook] = ([0] * (len(DECISION_BUCKETS) + 1), [0.0])
        latency[0][bisect_left(DECISION_BUCKETS, seconds)] += 1
        latency[1][0] += seconds

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            f"{NAMESPACE}_decisions",
            "Decisions by hook, deciding rule and outcome (rule 'none' when allowed).",
            labels=["hook", "rule", "outcome"],
        )
        for key, count in list(self.counts.items()):
            counts.add_metric(list(key), count)
        yield counts
        histogram = HistogramMetricFamily(
            f"{NAMESPACE}_decision_seconds",
            "Time the engine took to decide, by hook.",
            labels=["hook"],
        )
        for hook, (buckets, total) in list(self.latencies.items()):
            cumulative = list(accumulate(buckets))
            buckets_out = list(zip(_BUCKET_LABELS, cumulative, strict=True))
            histogram.add_metric([hook], buckets_out, total[0])
        yield histogram


class _StoreCollector:
    def __init__(self, health: StoreHealth) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{NAMESPACE}_store_up",
            "1 while the shared state store answers, 0 since a call to it failed.",
            value=1.0 if self.health.available else 0.0,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_store_failures",
            "Calls to the shared state store that failed (each met by on_store_error).",
            value=self.health.failures,
        )


class MetricsObserver:
    """Counts decisions, errors, breaker transitions, sheds, reloads and outbound drops."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = False
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        ns = NAMESPACE
        self.decision_tally = DecisionTally()
        reg.register(self.decision_tally)
        self.shadow_refusals = Counter(
            "shadow_refusals",
            "Refusals a shadow-mode rule would have made, by rule.",
            ["rule"],
            namespace=ns,
            registry=reg,
        )
        self.errors = Counter(
            "errors",
            "Handler errors by classified code and category.",
            ["code", "category"],
            namespace=ns,
            registry=reg,
        )
        self.alerts = Counter(
            "alerts",
            "Errors whose classification says alert: true, by code and category.",
            ["code", "category"],
            namespace=ns,
            registry=reg,
        )
        self.breaker_state = Gauge(
            "circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
            ["breaker"],
            namespace=ns,
            registry=reg,
        )
        self.breaker_transitions = Counter(
            "circuit_breaker_transitions",
            "Circuit breaker transitions.",
            ["breaker", "from_state", "to_state", "reason"],
            namespace=ns,
            registry=reg,
        )
        self.shed_total = Counter(
            "shed",
            "Connections or events shed under load, by rule and action.",
            ["rule", "action"],
            namespace=ns,
            registry=reg,
        )
        self.rate_limited_keys = Counter(
            "rate_limited_keys",
            "Rate-limit refusals by rule and key, for rules that set key_label (one series "
            "per refused key: keep such rules few).",
            ["rule", "key"],
            namespace=ns,
            registry=reg,
        )
        self.reloads = Counter(
            "policy_reloads",
            "Policy reloads by result (success or failure).",
            ["result"],
            namespace=ns,
            registry=reg,
        )
        self.policy = Info(
            "policy",
            "The policy in force: its version hash and source.",
            namespace=ns,
            registry=reg,
        )
        self.active_connections = Gauge(
            "active_connections", "Socket.IO connections open now.", namespace=ns, registry=reg
        )
        self.max_connections = Gauge(
            "max_connections",
            "The policy's connections.max_total; 0 when it sets none.",
            namespace=ns,
            registry=reg,
        )
        self.connection_events = Counter(
            "connection_events",
            "Connection lifecycle events (opened, closed, idle_closed, shed, recovered).",
            ["event"],
            namespace=ns,
            registry=reg,
        )
        self.outbound_drops = Counter(
            "outbound_drops",
            "Outgoing events dropped instead of queued, by reason.",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self.loop_lag_seconds = Gauge(
            "loop_lag_seconds",
            "Worst event-loop lag seen during the last sampling interval.",
            namespace=ns,
            registry=reg,
        )
        self.events_per_second = Gauge(
            "events_per_second",
            "Incoming events per second, as sampled.",
            namespace=ns,
            registry=reg,
        )
        self.overloaded_seconds = Gauge(
            "overloaded_seconds",
            "How long the loop lag has stayed above the overload threshold.",
            namespace=ns,
            registry=reg,
        )
        if process_metrics:
            ProcessCollector(registry=reg)
        self._breakers: set[str] = set()

    # -- Observer ---------------------------------------------------------------------------

    def decision(
        self,
        hook: str,
        decision: Decision,
        seconds: float,
        conn: Mapping[str, Any] | None,  # noqa: ARG002
    ) -> None:
        # ``_value_``: the member's value without the ``value`` property's call.
        self.decision_tally.add(hook, decision.rule or NO_RULE, decision.outcome._value_, seconds)
        if decision.key is not None:
            self.rate_limited_keys.labels(decision.rule, decision.key).inc()
        for rule in decision.shadowed:
            self.shadow_refusals.labels(rule).inc()

    def error(
        self,
        hook: str,  # noqa: ARG002
        classification: Classification,
        error: Mapping[str, Any],  # noqa: ARG002
        payload: Mapping[str, Any],  # noqa: ARG002
        conn: Mapping[str, Any] | None,  # noqa: ARG002
    ) -> None:
        self.errors.labels(classification.code, classification.category.value).inc()
        if classification.alert:
            self.alerts.labels(classification.code, classification.category.value).inc()

    def breaker_transition(self, name: str, transition: Transition) -> None:
        self._breakers.add(name)
        self.breaker_state.labels(name).set(BREAKER_STATE_VALUES[transition.to_state])
        self.breaker_transitions.labels(
            name,
            transition.from_state.value,
            transition.to_state.value,
            transition.reason.value,
        ).inc()

    def shed(self, rule: str, action: str, count: int) -> None:
        self.shed_total.labels(rule, action).inc(count)

    def reload(
        self,
        ok: bool,
        version: str | None,
        path: str,
        diagnostics: Sequence[Diagnostic],  # noqa: ARG002
    ) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        if ok and version is not None:
            self.policy.info({"version": version, "source": path})

    def connection(self, event: str, conn: Mapping[str, Any], reason: str = "") -> None:  # noqa: ARG002
        self.connection_events.labels(event).inc()

    def outbound_drop(self, conn: Mapping[str, Any], event: str, reason: str) -> None:  # noqa: ARG002
        self.outbound_drops.labels(reason).inc()

    # -- wiring -----------------------------------------------------------------------------

    def install_policy(self, policy: PolicySet, source: str | None = None) -> None:
        """Describe the policy now in force: its version, its connection ceiling, a state for
        every breaker, and a zero for every counter an alert rule watches.

        A breaker not seen before starts at closed; one that kept its name keeps its gauge
        (its state carried over); one the policy dropped disappears from the output.
        """
        self.policy.info({"version": policy.version, "source": source or policy.source})
        self.max_connections.set(policy.connections.max_total or 0)
        # Series an alert counts the increase of exist from the start, at 0: the first
        # refused reload, alerting error or disconnect shed is then an increase too.
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for rule in policy.errors:
            if rule.alert:
                self.alerts.labels(rule.code, rule.category.value)
        for spec in policy.shedding:
            if spec.hook is None:
                self.shed_total.labels(f"shedding/{spec.name}", "disconnect")
        self.track_breakers(spec.name for spec in policy.circuit_breakers)

    def track_breakers(self, names: Iterable[str]) -> None:
        wanted = set(names)
        for name in self._breakers - wanted:
            self.breaker_state.remove(name)
        for name in wanted - self._breakers:
            self.breaker_state.labels(name).set(BREAKER_STATE_VALUES[Circuit.CLOSED])
        self._breakers = wanted

    def track_candidate(self) -> tuple[Counter, Counter]:
        """The live canary's counters: decisions it judged again, and those that differ
        (``from`` the enforced verdict ``to`` the candidate's: ``allow``, ``delay`` or a
        refusal's code; ``rule`` the rule that refused)."""
        judged = Counter(
            "candidate_decisions",
            "Live decisions the candidate policy judged again in shadow.",
            namespace=NAMESPACE,
            registry=self.registry,
        )
        disagreements = Counter(
            "candidate_disagreements",
            "Live decisions the candidate policy would have made differently.",
            ["rule", "from", "to"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        return judged, disagreements

    def track_connections(self, count: Callable[[], int]) -> None:
        """Read the connection count at scrape time, so the gauge is never a tick behind."""
        self.active_connections.set_function(lambda: float(count()))

    def track_store(self, health: StoreHealth) -> None:
        """Export the shared store's health, read at scrape time: whether it answers now
        (``policy_engine_store_up``) and its failed calls so far
        (``policy_engine_store_failures_total``), each failure met by on_store_error."""
        self.registry.register(_StoreCollector(health))

    def observe_load(self, load: Mapping[str, int]) -> None:
        """Publish one load sample (the ``load`` context the engine's rules read)."""
        self.loop_lag_seconds.set(load.get("loop_lag_ms", 0) / 1000)
        self.events_per_second.set(load.get("events_per_second", 0))
        self.overloaded_seconds.set(load.get("overloaded_ms", 0) / 1000)
        self.active_connections.set(load.get("active_connections", 0))

    def render(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
