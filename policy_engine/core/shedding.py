"""Load shedding: what to refuse, drop, delay or disconnect while the server is overloaded.

A rule applies while its condition holds, and for ``sustained_for`` seconds before it acts,
so a single slow loop tick sheds nothing. Its ``load`` operands can only change with a new
load sample, so the rules they rule out are found once per sample (:meth:`Shedding.armed`)
rather than evaluated per event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.evaluation import matches
from policy_engine.core.payload import ClientPayload, system_refusal
from policy_engine.core.recorder import Recorder
from policy_engine.errors import EvaluationError
from policy_engine.language.model import (
    Mode,
    PolicySet,
    Priority,
    ShedAction,
    SheddingRuleSpec,
)

Clock = Callable[[], float]

_OUTCOMES = {
    ShedAction.REJECT: Outcome.REJECT,
    ShedAction.DROP: Outcome.DROP,
    ShedAction.DELAY: Outcome.DELAY,
}


class Shedding:
    """The shedding rules' per-process state: when each condition began to hold."""

    def __init__(self) -> None:
        self._armed_for: tuple[PolicySet, dict[str, Any]] | None = None
        self._armed: frozenset[str] = frozenset()
        self._since: dict[str, float] = {}

    def keep_clocks_of(self, policy: PolicySet) -> None:
        """After a reload: a rule that is still there keeps how long its condition held."""
        names = {rule.name for rule in policy.shedding}
        self._since = {name: at for name, at in self._since.items() if name in names}

    def armed(self, policy: PolicySet, load: dict[str, Any]) -> frozenset[str]:
        """The shedding rules whose ``load`` operands hold under the current load sample.

        The others cannot apply to any event until the next sample, so they are not
        evaluated per event; as their condition is false, their ``sustained_for`` clocks
        restart. A gate that fails to evaluate arms its rule, which then meets the policy's
        ``on_eval_error`` per event.
        """
        armed_for = self._armed_for
        if armed_for is not None and armed_for[0] is policy and armed_for[1] is load:
            return self._armed
        armed: set[str] = set()
        variables = {"load": load}
        for rule in policy.shedding:
            gate = rule.load_gate
            try:
                holds = gate is None or gate.evaluate(variables) is True
            except EvaluationError:
                holds = True
            if holds:
                armed.add(rule.name)
            else:
                self._since.pop(rule.name, None)
        self._armed_for, self._armed = (policy, load), frozenset(armed)
        return self._armed

    def shed(  # noqa: PLR0917 (every caller passes all of them)
        self,
        policy: PolicySet,
        rules: tuple[SheddingRuleSpec, ...],
        activation: Mapping[str, Any],
        priority: Priority | None,
        clock: Clock,
        recorder: Recorder,
        shadowed: list[str],
    ) -> Decision | None:
        """The first rule that applies to this hook call, as a decision; None when none."""
        if not rules:
            return None
        load = activation["load"]
        armed = self.armed(policy, load)
        for rule in rules:
            if priority is not None and priority.rank > rule.max_priority.rank:
                if recorder.enabled:
                    recorder.note(
                        "shedding", rule.name, False, "skip", {"priority": priority.value}
                    )
                continue
            # A rule not armed under this sample has a false condition: it is not evaluated.
            hit = rule.name in armed and self.sustained(rule, activation, clock)
            if recorder.enabled:
                outcome = rule.action.value if hit else "allow"
                recorder.note("shedding", rule.name, hit, outcome, {"load": dict(load)})
            if not hit:
                continue
            if rule.mode is Mode.SHADOW:
                shadowed.append(f"shedding/{rule.name}")
                continue
            if rule.action is ShedAction.DELAY:
                return Decision(Outcome.DELAY, f"shedding/{rule.name}", None, rule.delay)
            outcome = _OUTCOMES[rule.action]
            return Decision(outcome, f"shedding/{rule.name}", shed_payload(policy, rule))
        return None

    def sustained(
        self,
        rule: SheddingRuleSpec,
        activation: Mapping[str, Any],
        clock: Clock,
    ) -> bool:
        """Whether the rule's condition holds, and has held for ``sustained_for``."""
        if not matches(rule.when, activation, rule.on_eval_error):
            self._since.pop(rule.name, None)
            return False
        if rule.sustained_for <= 0:
            return True
        now = clock()
        since = self._since.setdefault(rule.name, now)
        return now - since >= rule.sustained_for

    def connections_to_shed(
        self,
        policy: PolicySet,
        load: dict[str, Any],
        connections: Iterable[Mapping[str, Any]],
        clock: Clock,
    ) -> list[tuple[str, ClientPayload]]:
        """On a sampler tick: the connections to disconnect now, lowest priority first."""
        activation = {"load": load}
        chosen: list[tuple[str, ClientPayload]] = []
        for rule in policy.shedding:
            if rule.action is not ShedAction.DISCONNECT or rule.mode is Mode.SHADOW:
                if rule.action is ShedAction.DISCONNECT:
                    self.sustained(rule, activation, clock)
                continue
            if not self.sustained(rule, activation, clock):
                continue
            ceiling = rule.max_priority.rank
            candidates = sorted(
                (c for c in connections if c["priority"] <= ceiling),
                key=lambda c: (c["priority"], -c["connected_ms"]),
            )
            for conn in candidates[: rule.max_disconnects]:
                chosen.append((conn["sid"], shed_payload(policy, rule)))
            break
        return chosen


def shed_payload(policy: PolicySet, rule: SheddingRuleSpec) -> ClientPayload:
    return system_refusal(
        policy,
        f"shedding/{rule.name}",
        code=rule.code,
        message=rule.message,
        retry_after=rule.retry_after,
    )
