"""Circuit breakers around event handlers: a permit per guarding breaker, then the outcome.

Before a handler runs, every breaker guarding its event is asked for a permit in policy
order; the first open one refuses the call (a shadow-mode breaker only lets it through),
and the permits already taken are handed back. After the handler, each breaker held hears
how the call went. A breaker the shared store cannot answer for lets the call through
unguarded, unless the policy says ``fail_closed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from policy_engine.algorithms.breaker import Permit, Transition
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.evaluation import matches
from policy_engine.core.payload import store_unavailable, system_refusal
from policy_engine.core.recorder import Recorder
from policy_engine.language.model import CircuitBreakerSpec, Mode, PolicySet
from policy_engine.state.guarded import ASK, STORE_REFUSED, GuardedStore


class BreakerGuard(NamedTuple):
    """The permits one event holds while its handler runs (a named tuple: one per event)."""

    permits: tuple[CircuitBreakerSpec, ...]
    started: float
    # Transitions that granting the permits caused (open -> half_open), for the observer.
    transitions: tuple[tuple[str, Transition], ...] = ()


NO_GUARD = BreakerGuard((), 0.0)


class Waiting(NamedTuple):
    """Permits half taken: the breaker at ``at`` needs the shared store's answer."""

    at: int
    taken: tuple[CircuitBreakerSpec, ...]
    transitions: tuple[tuple[str, Transition], ...]
    activation: dict[str, Any] | None


class Refused(NamedTuple):
    """A breaker refused the call; ``held`` are the permits to hand back."""

    decision: Decision
    held: tuple[CircuitBreakerSpec, ...]


def take_permits(  # noqa: PLR0917 (the call, and where a resumed walk stands)
    policy: PolicySet,
    state: GuardedStore,
    breakers: tuple[CircuitBreakerSpec, ...],
    variables: tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any], Any],
    now: float,
    recorder: Recorder,
    resumed: Waiting | None = None,
    answer: Permit | None = None,
) -> BreakerGuard | Refused | Waiting:
    """Walk the breakers in order, taking a permit from each that guards this call.

    Permits the state gives without I/O are taken on the way; at the first that needs the
    shared store the walk stops with :class:`Waiting`, and the caller resumes it with the
    store's ``answer``. ``variables`` (conn, claims, event, load) build the context only
    when a breaker's condition reads more than the event's name.
    """
    activation: dict[str, Any] | None = None
    taken: list[CircuitBreakerSpec] = []
    transitions: list[tuple[str, Transition]] = []
    rest = breakers
    if resumed is not None:
        activation = resumed.activation
        taken.extend(resumed.taken)
        transitions.extend(resumed.transitions)
        refusal = hold(policy, breakers[resumed.at], answer, taken, transitions, recorder)
        if refusal is not None:
            return Refused(refusal, tuple(taken))
        rest = breakers[resumed.at + 1 :]
    for spec in rest:
        if not spec.match.is_name_test:
            if activation is None:
                conn, claims, event, load = variables
                activation = {"conn": conn, "claims": claims, "event": event, "load": load}
            if not matches(spec.match, activation, spec.on_eval_error):
                continue
        permit = state.permit_now(spec, now)
        if permit is ASK:
            at = breakers.index(spec)
            return Waiting(at, tuple(taken), tuple(transitions), activation)
        if permit.permitted:  # the common case, without a call
            taken.append(spec)
            if permit.transition is not None:
                transitions.append((spec.name, permit.transition))
            if recorder.enabled:
                recorder.note("circuit_breakers", spec.name, False, "allow")
            continue
        refusal = hold(policy, spec, permit, taken, transitions, recorder)
        if refusal is not None:
            return Refused(refusal, tuple(taken))
    return BreakerGuard(tuple(taken), now, tuple(transitions)) if taken else NO_GUARD


def hold(  # noqa: PLR0917 (a walk's state, passed along)
    policy: PolicySet,
    spec: CircuitBreakerSpec,
    permit: Permit | None,
    taken: list[CircuitBreakerSpec],
    transitions: list[tuple[str, Transition]],
    recorder: Recorder,
) -> Decision | None:
    """Note what one breaker answered; its refusal, unless the call may go on past it."""
    if permit is not None and permit.permitted:
        taken.append(spec)
        if permit.transition is not None:
            transitions.append((spec.name, permit.transition))
        recorder.note("circuit_breakers", spec.name, False, "allow")
        return None
    # No answer from the store (its failure mode let the call through), or shadow mode.
    if permit is None:
        recorder.note("circuit_breakers", spec.name, False, "unanswered")
        return None
    if spec.mode is Mode.SHADOW:
        recorder.note("circuit_breakers", spec.name, True, "shadow-reject")
        return None
    recorder.note("circuit_breakers", spec.name, True, "reject")
    return _refusal(policy, spec, permit)


def _refusal(policy: PolicySet, spec: CircuitBreakerSpec, permit: Permit) -> Decision:
    """The breaker's refusal; with a ``fallback``, that fallback is the answer instead.

    A fallback is what the caller gets back in place of the handler's result, so it is the
    decision's payload under ``drop``: the adapter sends it as the ack the client asked
    for, and nothing to a client that asked for none (there is no error to tell it of).
    """
    rule = f"circuit_breakers/{spec.name}"
    if permit is STORE_REFUSED:
        return Decision(Outcome.REJECT, rule, store_unavailable(policy, rule, permit.retry_after))
    if spec.fallback is not None:
        return Decision(Outcome.DROP, rule, dict(spec.fallback))
    payload = system_refusal(
        policy, rule, code=spec.code, message=spec.message, retry_after=permit.retry_after
    )
    return Decision(Outcome.REJECT, rule, payload)


def recorded_failures(  # noqa: PLR0917 (the failed call's whole story)
    guard: BreakerGuard,
    duration: float,
    conn: Mapping[str, Any],
    event: Mapping[str, Any],
    classification: Classification,
    error: Mapping[str, Any] | None,
) -> tuple[bool | None, ...]:
    """For a call that raised: whether each breaker held counts it as a failure (True) or
    ignores it (None: neither a failure nor a success, its permit handed back).

    As in Resilience4j, ``record_when`` judges exceptions only: a return is a success, and
    slow calls are counted through the breaker's ``slow_call`` settings. An exception
    outside ``record_when`` is ignored: counted as a success, a cheap client error could
    close a breaker by winning its half-open probes.
    """
    if not any(spec.record_when for spec in guard.permits):
        return (True,) * len(guard.permits)
    call = {"duration_ms": int(duration * 1000), "failed": True, "event": event["name"]}
    error_var = classification.as_context(error or {})
    activation = {"conn": conn, "event": event, "error": error_var, "call": call}
    return tuple(
        True
        if spec.record_when is None or matches(spec.record_when, activation, spec.on_eval_error)
        else None
        for spec in guard.permits
    )
