"""What an event's CEL conditions see of its payload: checked once, cut to the keys read.

cel-expr-python converts the ``event`` variable into its own values on every evaluation.
That conversion refuses an integer beyond 64 bits or a lone surrogate anywhere in a map it
converts (the condition then fails to evaluate, which must never switch a rule off), reads
a string only up to a NUL (``"ls\\u0000; rm -rf /"`` would pass an unanchored
``matches``), and costs in proportion to everything sent. So, for an event some condition
of which runs in that engine, the payload is walked once, before any condition sees it:

* only the top-level keys the policy's conditions select (``event.payload.cmd``) are
  walked and handed to CEL; a condition that reads the payload as a whole gets all of it;
* such a value is refused as ``INVALID_PAYLOAD`` (not retryable: resending cannot help),
  never mapped to something else the application would not see;
* the event's cost is bounded, in values: each value walked (and later converted) is one,
  each element a comprehension (``exists``, ``all``, ...) iterates over a payload key is
  one more, and ``filter`` or ``map`` over n elements, which copy their result at every
  step, cost ``n * n / QUADRATIC_SHARE``. Beyond :data:`VALUE_BUDGET` the event is refused
  ``PAYLOAD_TOO_COMPLEX`` before any condition runs: what conditions may be made to do is
  bounded by the engine, not by whoever sends the event (a schema ``maxItems`` bounds it
  tighter, per event, and ``validate`` warns where none does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from policy_engine.cel.analysis import comprehensions_over, fields_read_under
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.payload import INVALID_PAYLOAD, INVALID_REQUEST, PAYLOAD_TOO_COMPLEX
from policy_engine.core.recorder import Recorder
from policy_engine.language.contexts import Hook
from policy_engine.language.model import EventPlan, EventSpec, Expression, PolicySet

VALUE_BUDGET: Final = 1_000
"""The most an event's conditions may be made to read and iterate, in values (strings,
numbers, list items, map entries); a heavier event is refused before any is read."""
QUADRATIC_SHARE: Final = 6
"""``filter``/``map`` over n elements take about as long as walking ``n * n / 6`` values."""

_INT_MIN: Final = -(2**63)  # int64's least
_INT_MAX: Final = 2**64 - 1  # uint64's greatest
_SCALARS: Final = frozenset({float, bool, type(None), bytes})


class PayloadView(NamedTuple):
    """What one event plan's conditions read of the payload, and which group first does."""

    keys: frozenset[str] | None  # None: the payload as a whole
    sheds: bool  # a shedding condition converts the event
    limits: bool  # a rate limit's condition or key does
    guards: bool  # a circuit breaker's match does
    # The payload keys comprehensions iterate ("": the payload itself), and whether by
    # filter or map.
    iterated: tuple[tuple[str, bool], ...] = ()


def views_for(policy: PolicySet) -> dict[str, PayloadView | None]:
    """Per event name the policy names, and ``""`` for all others: None when no condition
    of that event runs in a converting engine (nothing to check); empty when none does."""
    plans = policy.event_plans
    views = {name: view_of(plan) for name, plan in plans.named.items()}
    views[""] = view_of(plans.other)
    return views if any(view is not None for view in views.values()) else {}


def view_of(plan: EventPlan) -> PayloadView | None:
    shedding = [rule.when for rule in plan.shedding]
    limits = [e for rule in plan.rate_limits for e in (rule.when, rule.key) if e is not None]
    others = [rule.when for rule in plan.authorization] + [b.match for b in plan.breakers]
    everything = shedding + limits + others
    if not any(_converts_event(e) for e in everything):
        return None
    reads = [fields_read_under(e.source, "event", "payload") for e in everything]
    keys = None if None in reads else frozenset().union(*(r for r in reads if r is not None))
    iterated = {
        (key, macro in _COPYING)
        for e in everything
        for key, macro, _ in comprehensions_over(e.source, "event", "payload")
    }
    return PayloadView(
        keys,
        sheds=any(_converts_event(e) for e in shedding),
        limits=any(_converts_event(e) for e in limits),
        guards=any(_converts_event(b.match) for b in plan.breakers),
        iterated=tuple(sorted(iterated)),
    )


_COPYING: Final = frozenset({"filter", "map"})


def iteration_cost(view: PayloadView, payload: Any) -> int:
    """What the comprehensions over this payload's keys cost, in values."""
    cost = 0
    for key, copying in view.iterated:
        items = payload if not key else payload.get(key) if type(payload) is dict else None
        if type(items) is list or type(items) is dict:
            size = len(items)
            cost += size * size // QUADRATIC_SHARE if copying else size
    return cost


def cel_event(
    view: PayloadView, spec: EventSpec, event: Mapping[str, Any], recorder: Recorder
) -> dict[str, Any] | Decision:
    """The event as its conditions see it, or the refusal of a payload they must not read.

    A refusal is named after the event's spec (``events/*`` for unnamed events), never after
    the name the client sent.
    """
    payload = event["payload"]
    keys = view.keys
    if keys is not None and type(payload) is dict:
        payload = {key: payload[key] for key in keys if key in payload}
    budget = VALUE_BUDGET - iteration_cost(view, payload) if view.iterated else VALUE_BUDGET
    problem = payload_problem([event["name"], payload], budget)
    if problem is None:
        seen = dict(event)
        seen["payload"] = payload
        return seen
    name = spec.name
    if recorder.enabled:
        recorder.note("events", name, True, "reject", {"payload": problem})
    if problem is _OVER_BUDGET:
        refusal = PAYLOAD_TOO_COMPLEX.payload(f"events/{name}", max_values=VALUE_BUDGET)
    else:
        refusal = INVALID_PAYLOAD.payload(f"events/{name}", detail=problem)
    return Decision(Outcome.REJECT, f"events/{name}", refusal)


_OVER_BUDGET: Final = "more values than the budget"


def payload_problem(values: list[Any], budget: int) -> str | None:
    """Why these JSON values cannot be handed to CEL as they are, or None.

    One iterative walk (nesting cannot exhaust a stack), which stops as soon as more than
    ``budget`` values were seen or queued.
    """
    pending = values
    seen = len(pending)
    if seen > budget:
        return _OVER_BUDGET
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is str:
            if not _clean(value):
                return "a string holds a NUL character or an unpaired surrogate"
        elif kind is int:
            if not _INT_MIN <= value <= _INT_MAX:
                return "an integer is outside the 64-bit range"
        elif kind is dict:
            seen += len(value)
            if seen > budget:
                return _OVER_BUDGET
            for key in value:
                if type(key) is not str or not _clean(key):
                    return "a key holds a NUL character or an unpaired surrogate"
            pending.extend(value.values())
        elif kind is list:
            seen += len(value)
            if seen > budget:
                return _OVER_BUDGET
            pending.extend(value)
        elif kind not in _SCALARS:
            return f"a {kind.__name__} is not a JSON value"
    return _OVER_BUDGET if seen > budget else None


def _clean(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _converts_event(expression: Expression) -> bool:
    """Whether evaluating ``expression`` hands ``event`` to a converting engine."""
    return _converts(expression, "event")


def _converts(expression: Expression, variable: str | None = None) -> bool:
    """Whether evaluating ``expression`` hands ``variable`` (any, for None) to a
    converting engine."""
    if expression.event_names is not None:
        if expression.is_name_test:
            return False
        program: Any = expression.residual or expression.program
    else:
        program = expression.program
    if expression.path is not None:
        return False  # a plain field, read as a dict lookup (a rate-limit key)
    if not getattr(program, "converts", True):
        return False
    return variable is None or variable in getattr(program, "variables", {variable})


def handshake_checked(policy: PolicySet) -> bool:
    """Whether a connect condition runs in a converting engine: then the handshake's
    ``conn`` and ``claims`` are checked as a payload is, before any condition reads them
    (a query value may carry a NUL, a client's ``auth`` any JSON)."""
    index = policy.by_hook
    rules = [
        *(rule.when for rule in index.shedding[Hook.CONNECT]),
        *(rule.when for rule in index.authorization[Hook.CONNECT]),
        *(e for rule in index.rate_limits[Hook.CONNECT] for e in (rule.when, rule.key) if e),
    ]
    return any(_converts(expression) for expression in rules)


def handshake_refusal(conn: Mapping[str, Any], claims: Mapping[str, Any]) -> Decision | None:
    """The refusal of a handshake whose values CEL cannot read as they are."""
    problem = payload_problem([conn, claims], VALUE_BUDGET)
    if problem is None:
        return None
    if problem is _OVER_BUDGET:
        problem = f"more than {VALUE_BUDGET} values to check"
    return Decision(Outcome.REJECT, "identity", INVALID_REQUEST.payload("identity", detail=problem))
