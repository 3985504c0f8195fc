"""Progressive delays after failed authentication, per client address and per user.

After ``threshold`` failures within ``window``, each new attempt must wait longer (the
policy's backoff, without jitter: a server-side wait must be predictable); after
``block_after`` failures the client is refused until the window forgets the oldest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.algorithms.backoff import exponential
from policy_engine.core.classify import Classification
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.payload import AUTH_BLOCKED, AUTH_THROTTLED, backoff_for
from policy_engine.core.recorder import Recorder
from policy_engine.language.model import BackoffSpec, PolicySet
from policy_engine.state.guarded import GuardedStore

_RULE = "connections/auth_failures"


def auth_keys(conn: Mapping[str, Any]) -> list[str]:
    keys = [f"ip:{conn['ip']}"]
    if conn["user_id"]:
        keys.append(f"user:{conn['user_id']}")
    return keys


def counts_as_auth_failure(policy: PolicySet, classification: Classification) -> bool:
    spec = policy.connections.auth_failures
    return spec is not None and classification.code in spec.codes


async def record_auth_failure(
    policy: PolicySet, state: GuardedStore, conn: Mapping[str, Any], now: float
) -> int:
    """Count a failed authentication against the client's IP and user; the worst count."""
    spec = policy.connections.auth_failures
    if spec is None:
        return 0
    counts = [await state.record_auth_failure(key, spec.window, now) for key in auth_keys(conn)]
    return max(counts, default=0)


async def clear_auth_failures(
    policy: PolicySet, state: GuardedStore, conn: Mapping[str, Any]
) -> None:
    """After a verified sign-in: that user's failures only. An address's count is never
    cleared by a success, which an attacker could make with its own account."""
    if policy.connections.auth_failures is None or not conn["user_id"]:
        return
    await state.clear_auth_failures(f"user:{conn['user_id']}")


async def throttle(
    policy: PolicySet,
    state: GuardedStore,
    conn: Mapping[str, Any],
    now: float,
    recorder: Recorder,
) -> Decision | None:
    """The refusal of a connect that comes too soon after failed authentications."""
    spec = policy.connections.auth_failures
    if spec is None:
        return None
    worst_count, last = 0, 0.0
    for key in auth_keys(conn):
        count, at = await state.auth_failures(key, spec.window, now)
        if count > worst_count:
            worst_count, last = count, at
    matched = worst_count >= spec.threshold
    recorder.note("connections", "auth_failures", matched, "check", {"failures": worst_count})
    backoff = backoff_for(policy, spec.backoff)
    if spec.block_after and worst_count >= spec.block_after:
        wait = max(0.0, last + spec.window - now)
        payload = AUTH_BLOCKED.payload(_RULE, retry_after=wait, backoff=backoff)
        return Decision(Outcome.REJECT, _RULE, payload)
    if not matched:
        return None
    delay = deterministic_delay(policy.backoff[spec.backoff], worst_count - spec.threshold + 1)
    wait = last + delay - now
    if wait <= 0:
        return None
    payload = AUTH_THROTTLED.payload(_RULE, retry_after=wait, backoff=backoff)
    return Decision(Outcome.REJECT, _RULE, payload)


def deterministic_delay(spec: BackoffSpec, attempt: int) -> float:
    """The un-jittered delay of a backoff policy, capped at its ``max`` however long the
    run of failures (the guarded formula of :mod:`policy_engine.algorithms.backoff`)."""
    return exponential(spec.base, spec.multiplier, max(1, attempt), spec.max)
