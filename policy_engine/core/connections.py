"""Connection limits and priorities: what a connect that passed every rule still has to meet.

A connection is counted against ``max_total``, ``max_per_user`` and ``max_per_ip`` only
once every other check let it in, and released on disconnect; the guarded state remembers
where it was counted, so a count made in this process's state (the shared store was down)
is released there too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.evaluation import evaluate_value
from policy_engine.core.payload import STORE_UNAVAILABLE as STORE_DOWN
from policy_engine.core.payload import TOO_MANY_CONNECTIONS, backoff_for
from policy_engine.core.recorder import Recorder
from policy_engine.errors import EvaluationError
from policy_engine.language.model import PolicySet
from policy_engine.state.guarded import STORE_UNAVAILABLE, GuardedStore
from policy_engine.state.protocol import ConnectionLimits


async def count_connection(
    policy: PolicySet, state: GuardedStore, conn: Mapping[str, Any], recorder: Recorder
) -> Decision | None:
    """Count a new connection; the refusal when a ceiling is reached (it is not counted).

    The refusal is retryable, with the policy's ``retry_after`` and default backoff: a
    ceiling reached now (or a count that cannot be made now) may well pass later.
    """
    limits = policy.connections
    if not (limits.max_total or limits.max_per_user or limits.max_per_ip):
        return None
    ceilings = ConnectionLimits(
        conn["user_id"], conn["ip"], limits.max_total, limits.max_per_user, limits.max_per_ip
    )
    ceiling = await state.open_connection(conn["sid"], ceilings)
    outcome = "reject" if ceiling else "allow"
    recorder.note("connections", "limits", ceiling is not None, outcome, {"ceiling": ceiling})
    if ceiling is None:
        return None
    rule = f"connections/{ceiling}"
    backoff = backoff_for(policy)
    if ceiling == STORE_UNAVAILABLE:
        payload = STORE_DOWN.payload(rule, retry_after=limits.retry_after, backoff=backoff)
    else:
        payload = TOO_MANY_CONNECTIONS.payload(
            rule, retry_after=limits.retry_after, backoff=backoff, ceiling=ceiling.replace("_", " ")
        )
    return Decision(Outcome.REJECT, rule, payload)


def priority(policy: PolicySet, activation: Mapping[str, Any]) -> int:
    """A connection's shedding priority, from the policy's expression (0 when it fails)."""
    expression = policy.connections.priority
    if expression is None:
        return 0
    try:
        value = evaluate_value(expression, activation)
    except EvaluationError:
        return 0
    return value if isinstance(value, int) else 0
