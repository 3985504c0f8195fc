"""Rate limits: which limits apply and under which key, the store's verdict, the refusal.

A hook call's limits are judged in three steps: each rule's condition and key are
evaluated (no state), the state answers the checks (synchronously when it can, see
:mod:`policy_engine.state.guarded`; else :class:`RateCheck` awaits the shared store), and
:func:`conclude` turns the answers into the refusal and the shadowed names. Enforced
limits are judged together, so one refused limit consumes nothing from the others; a
shadow limit is judged on its own and refuses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.evaluation import evaluate_value, matches
from policy_engine.core.payload import backoff_for, client_payload, store_unavailable
from policy_engine.core.recorder import Recorder
from policy_engine.errors import EvaluationError
from policy_engine.language.model import (
    Category,
    EvalFailureMode,
    Expression,
    Mode,
    PolicySet,
    RateLimitSpec,
)
from policy_engine.state.guarded import ASK, Ask, GuardedStore, store_refused

Check = tuple[RateLimitSpec, str]
Answer = RateDecision | CombinedDecision
_UNANSWERED = "rate limits concluded before the state answered them"


class RateCheck:
    """Limits whose answers the shared store still owes; the state gave the others."""

    __slots__ = ("enforced", "enforced_answer", "now", "shadow", "shadow_answers")

    def __init__(
        self,
        shadow: list[Check],
        shadow_answers: list[Answer | Ask],
        enforced: list[Check],
        enforced_answer: Answer | Ask | None,
        now: float,
    ) -> None:
        self.shadow, self.shadow_answers = shadow, shadow_answers
        self.enforced, self.enforced_answer = enforced, enforced_answer
        self.now = now

    async def answer(self, state: GuardedStore) -> None:
        """Ask the state for the rest, awaiting the shared store."""
        now, answers = self.now, self.shadow_answers
        for at, check in enumerate(self.shadow):
            if answers[at] is ASK:
                answers[at] = await state.rates((check,), now)
        if self.enforced_answer is ASK:
            self.enforced_answer = await state.rates(self.enforced, now)

    def conclude(
        self, policy: PolicySet, recorder: Recorder, shadowed: list[str]
    ) -> Decision | None:
        return conclude(
            policy,
            self.shadow,
            self.shadow_answers,
            self.enforced,
            self.enforced_answer,
            recorder,
            shadowed,
        )


class RateLimits:
    """The per-process part of rate limiting: keys computed once per connection."""

    def __init__(self) -> None:
        # Keys that read only conn and claims, per connection (sid) and expression.
        self._connection_keys: dict[str, dict[tuple[str, Any], str]] = {}

    def forget(self, sid: str) -> None:
        self._connection_keys.pop(sid, None)

    def judge(  # noqa: PLR0917 (every caller passes all seven)
        self,
        policy: PolicySet,
        rules: tuple[RateLimitSpec, ...],
        activation: Mapping[str, Any],
        now: float,
        state: GuardedStore,
        recorder: Recorder,
        shadowed: list[str],
    ) -> Decision | RateCheck | None:
        """The limits that apply, with their keys, judged as far as the state answers now.

        Returns the refusal (None: none), or a :class:`RateCheck` when the shared store
        must answer first. A condition that cannot be evaluated applies the limit and a key
        that cannot be computed refuses when the rule's ``on_eval_error`` is ``fail_closed``
        (its default); under ``fail_open`` the limit is left out.
        """
        enforced: list[Check] = []
        shadow: list[Check] = []
        for rule in rules:
            if rule.when is not None and not matches(rule.when, activation, rule.on_eval_error):
                if recorder.enabled:
                    recorder.note("rate_limits", rule.name, False, "skip")
                continue
            try:
                key = self._key(rule.key, activation)
            except EvaluationError as exc:
                if recorder.enabled:
                    detail = {"error": str(exc)}
                    recorder.note("rate_limits", rule.name, False, "key-error", detail)
                if rule.on_eval_error is EvalFailureMode.FAIL_CLOSED:
                    return refusal(policy, rule, rule.rate.interval)
                continue
            (shadow if rule.mode is Mode.SHADOW else enforced).append((rule, key))
        complete = True
        shadow_answers: list[Answer | Ask] = []
        for rule, key in shadow:
            answer = state.rate_now(rule, key, now)
            shadow_answers.append(answer)
            complete = complete and answer is not ASK
        enforced_answer: Answer | Ask | None = None
        if enforced:
            if len(enforced) == 1:
                rule, key = enforced[0]
                enforced_answer = state.rate_now(rule, key, now)
            else:
                enforced_answer = state.rates_now(enforced, now)
            complete = complete and enforced_answer is not ASK
        if not complete:
            return RateCheck(shadow, shadow_answers, enforced, enforced_answer, now)
        return conclude(
            policy, shadow, shadow_answers, enforced, enforced_answer, recorder, shadowed
        )

    def _key(self, expression: Expression, activation: Mapping[str, Any]) -> str:
        if not expression.per_connection or expression.path is not None:
            return str(evaluate_value(expression, activation))
        sid = activation["conn"]["sid"]
        keys = self._connection_keys.get(sid)
        if keys is None:
            keys = self._connection_keys[sid] = {}
        # Keyed as Expression compares (source and context), without its Python-level hash.
        identity = (expression.source, expression.context)
        key = keys.get(identity)
        if key is None:
            key = keys[identity] = str(evaluate_value(expression, activation))
        return key


def conclude(  # noqa: PLR0917 (the checks and their answers)
    policy: PolicySet,
    shadow: list[Check],
    shadow_answers: list[Answer | Ask],
    enforced: list[Check],
    enforced_answer: Answer | Ask | None,
    recorder: Recorder,
    shadowed: list[str],
) -> Decision | None:
    """The refusal the answers make, if any; shadow limits that refused join ``shadowed``."""
    for (rule, key), result in zip(shadow, shadow_answers):  # noqa: B905 (same length)
        if result is ASK:
            raise RuntimeError(_UNANSWERED)
        if recorder.enabled:
            verdict = "shadow-" + ("allow" if result.allowed else "reject")
            detail = {"key": key, "retry_after": result.retry_after}
            recorder.note("rate_limits", rule.name, True, verdict, detail)
        if not result.allowed:
            shadowed.append(f"rate_limits/{rule.name}")
    decided = enforced_answer
    if decided is None:
        return None
    if decided is ASK:
        raise RuntimeError(_UNANSWERED)
    if decided.allowed and not recorder.enabled:
        return None
    deciding = decided.rule if isinstance(decided, CombinedDecision) else enforced[0][0].name
    if recorder.enabled:
        for rule, key in enforced:
            decides = deciding == rule.name
            verdict = "reject" if decides and not decided.allowed else "allow"
            detail = {"key": key, "retry_after": decided.retry_after if decides else 0.0}
            recorder.note("rate_limits", rule.name, True, verdict, detail)
    if decided.allowed:
        return None
    for rule, key in enforced:
        if rule.name == deciding:
            if isinstance(decided, CombinedDecision) and store_refused(decided):
                name = f"rate_limits/{rule.name}"
                payload = store_unavailable(policy, name, decided.retry_after)
                return Decision(Outcome.REJECT, name, payload, key=key if rule.key_label else None)
            return refusal(policy, rule, decided.retry_after, key)
    return None


def refusal(
    policy: PolicySet, rule: RateLimitSpec, retry_after: float, key: str | None = None
) -> Decision:
    payload = client_payload(
        code=rule.code,
        category=Category.CLIENT,
        message=rule.message,
        retryable=True,
        retry_after=retry_after,
        backoff=backoff_for(policy),
        policy=f"rate_limits/{rule.name}",
    )
    return Decision(
        Outcome.REJECT,
        f"rate_limits/{rule.name}",
        payload,
        key=key if rule.key_label else None,
    )
