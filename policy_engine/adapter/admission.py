"""Connect refusals a client should retry: queued, remembered for the gate, and sent so a
plain socket.io-client retries them.

socket.io-client never reconnects after a namespace ``connect_error``: it retries only when
the transport fails. So a refusal that retrying can fix (load shed, a connect rate limit, a
connection ceiling, the shared store unavailable) is not sent as ``connect_error``. The
Engine.IO session is closed instead, and the plain client reconnects with its own backoff.
Its advice goes first, as an event on :data:`ADVICE_NAMESPACE`: a namespace the client
never joined, which a plain client's sockets ignore and a client that wants the advice
reads from its manager (``socket.io.on("packet", ...)``). What retrying cannot fix
(authentication, authorization, an invalid handshake) keeps its ``connect_error``.

A connect refused by a connect rate limit or a ceiling first waits in the admission queue
(:mod:`policy_engine.core.admission`) when the policy sets one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from policy_engine.cel.analysis import names_read
from policy_engine.core.admission import (
    ADVICE_EVENT,
    ADVICE_NAMESPACE,
    AdmissionQueue,
    LineKey,
    Ticket,
    retry_after_ms,
)
from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.evaluation import evaluate_value
from policy_engine.core.payload import STORE_UNAVAILABLE
from policy_engine.errors import EvaluationError
from policy_engine.language.model import PolicySet, RateLimitSpec

__all__ = ["ADVICE_EVENT", "ADVICE_NAMESPACE", "admit", "advice_packet", "retried_by_transport"]

CEILINGS = frozenset(
    {"connections/max_total", "connections/max_per_ip", "connections/max_per_user"}
)


def retried_by_transport(decision: Decision) -> bool:
    """Whether a refused connect is one retrying can fix, so the transport is closed."""
    rule = decision.rule or ""
    payload = decision.payload or {}
    if payload.get("code") == STORE_UNAVAILABLE.code:
        return True
    if not payload.get("retryable"):
        return False
    return rule.startswith(("shedding/", "rate_limits/")) or rule in CEILINGS


def advice_packet(payload: Mapping[str, Any]) -> str:
    """The Socket.IO EVENT packet, as Engine.IO message text, that carries the advice."""
    data = json.dumps([ADVICE_EVENT, dict(payload)], separators=(",", ":"))
    return f"2{ADVICE_NAMESPACE},{data}"


def line_of(
    policy: PolicySet, decision: Decision, activation: Mapping[str, Any]
) -> tuple[LineKey, str | None] | None:
    """The admission line a refused connect joins, and the gate scope of that line (``""``:
    every client; ``ip:<address>``: one address; None: the gate cannot tell), or None when
    the refusal is not one a queue can wait out."""
    rule = decision.rule or ""
    payload = decision.payload or {}
    if payload.get("code") == STORE_UNAVAILABLE.code:
        return None
    conn = activation["conn"]
    if rule == "connections/max_total":
        return (rule, ""), ""
    if rule == "connections/max_per_ip":
        return (rule, conn["ip"]), f"ip:{conn['ip']}"
    if rule == "connections/max_per_user":
        return (rule, conn["user_id"]), None
    if not rule.startswith("rate_limits/"):
        return None
    spec = next((r for r in policy.rate_limits if f"rate_limits/{r.name}" == rule), None)
    if spec is None:
        return None
    try:
        key = str(evaluate_value(spec.key, activation))
    except EvaluationError:
        return None
    return (rule, key), _gate_scope(spec, key, conn["ip"])


def _gate_scope(spec: RateLimitSpec, key: str, ip: str) -> str | None:
    """Where the gate may repeat a rate limit's refusal: a limit whose condition reads at
    most the load applies to every handshake; its key then says to whom."""
    if spec.when is not None and not _reads_at_most(spec.when.source, frozenset({"load"})):
        return None
    if _reads_at_most(spec.key.source, frozenset()):
        return ""
    if spec.key.path == ("conn", "ip") and key == ip:
        return f"ip:{ip}"
    return None


@functools.lru_cache(maxsize=256)
def _reads_at_most(source: str, names: frozenset[str]) -> bool:
    return names_read(source) <= names


def hint_of(decision: Decision, fallback: float) -> float:
    """The refusal's own retry time, in seconds."""
    retry = (decision.payload or {}).get("retry_after_ms")
    return retry / 1000 if isinstance(retry, int | float) and retry > 0 else fallback


def with_retry(decision: Decision, seconds: float) -> Decision:
    """The refusal, advising to come back after ``seconds`` (what the line needs), with a
    backoff capped at twice that: a client that follows the advice must not back off far
    past the moment the server can take it (see :func:`sized_backoff`)."""
    payload = dict(decision.payload or {})
    payload["retry_after_ms"] = retry_after_ms(seconds)
    payload["backoff"] = sized_backoff(payload.get("backoff"), payload["retry_after_ms"])
    return Decision(Outcome.REJECT, decision.rule, payload, key=decision.key)


def sized_backoff(backoff: Any, retry_ms: int) -> Any:
    """The advised backoff with ``max_ms`` no more than twice ``retry_ms`` (and never under
    ``base_ms``): the spread the jitter gives stays, the growth past the need goes."""
    if not isinstance(backoff, Mapping):
        return backoff
    base, cap = backoff.get("base_ms"), backoff.get("max_ms")
    if not isinstance(base, int | float) or not isinstance(cap, int | float):
        return dict(backoff)
    return {**backoff, "max_ms": min(cap, max(base, 2 * retry_ms))}


async def admit(  # noqa: PLR0917 (the queue's parties, all passed)
    queue: AdmissionQueue,
    policy: PolicySet,
    decision: Decision,
    activation: Mapping[str, Any],
    judge: Callable[[], Awaitable[Decision]],
    session: str,
    session_open: Callable[[], bool],
) -> Decision:
    """Wait in the admission queue, judged again at each turn: the decision that ends it.

    A refusal that ends it carries ``retry_after_ms`` from the line it was refused on, and
    is remembered there for the handshake gate. The place held is given up on every path
    (admitted, refused, timed out, the session gone, cancelled), once.
    """
    spec = policy.connections.queue
    fallback = policy.connections.retry_after
    deadline = queue.clock() + spec.max_wait
    ticket: Ticket | None = None
    try:
        while True:
            placed = line_of(policy, decision, activation)
            if decision.allowed or placed is None:
                if decision.allowed and ticket is not None:
                    ticket.admitted()
                return decision
            key, scope = placed
            hint = hint_of(decision, fallback)
            if ticket is None or ticket.key != key:
                if ticket is not None:
                    ticket.leave()
                    ticket = None
                joined = queue.join(key, spec, hint, deadline - queue.clock(), session)
                if not isinstance(joined, Ticket):
                    return _refused(queue, key, scope, decision, joined)
                ticket = joined
            turn = await ticket.turn(hint, deadline)
            if ticket.left or not session_open():
                # Gone while it waited: nobody to tell, and nothing for the gate to repeat.
                return with_retry(decision, queue.wait_for(key, hint))
            if not turn:
                return _refused(queue, key, scope, decision, queue.wait_for(key, hint))
            decision = await judge()
    finally:
        if ticket is not None:
            ticket.leave()


def _refused(
    queue: AdmissionQueue, key: LineKey, scope: str | None, decision: Decision, wait: float
) -> Decision:
    refused = with_retry(decision, wait)
    queue.refused(key, refused.payload or {}, wait, scope)
    return refused
