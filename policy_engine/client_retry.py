"""What the client helpers share, whichever python-socketio client they drive.

:mod:`policy_engine.client` wraps ``socketio.AsyncClient`` and :mod:`policy_engine.client_sync`
wraps ``socketio.Client``; the two differ only in ``await``. Everything that decides (reading
the contract payload, checking the advice that crossed the network, the waits, when to give
up) lives here once, so the two cannot drift apart: a sync client that retried on other
terms than an async one would break the contract the documentation promises for both.

Nothing here imports python-socketio; the one piece that touches a client
(:func:`record_trigger`) reads attributes both client classes have.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Mapping
from typing import Any

from policy_engine.algorithms.backoff import Random, compute_delay
from policy_engine.core.admission import ADVICE_EVENT, ADVICE_NAMESPACE
from policy_engine.errors import PolicyEngineError
from policy_engine.language.model import BackoffSpec, BackoffStrategy

__all__ = [
    "DEFAULT_BACKOFF",
    "CallRetries",
    "ConnectRetries",
    "ConnectionRefused",
    "EventRefused",
    "PolicyRefusedError",
    "RetryPlan",
    "backoff_from",
    "connect_options",
    "contract_payload",
    "record_trigger",
]

DEFAULT_BACKOFF = BackoffSpec(
    name="client-default",
    strategy=BackoffStrategy.FULL_JITTER,
    base=0.5,
    max=30.0,
    max_attempts=10,
    multiplier=2.0,
)
"""Used until the server has given advice, for example while it cannot be reached at all."""

_log = logging.getLogger("policy_engine.client")


class PolicyRefusedError(PolicyEngineError):
    """The server refused under its policy; ``payload`` is what it sent.

    ``payload`` is the client contract's object, or the raw refusal data when a server
    without the policy refused with none (then ``code`` is ``None``).
    """

    def __init__(self, payload: Mapping[str, Any]) -> None:
        self.payload: dict[str, Any] = dict(payload)
        super().__init__(f"{self.code or 'REFUSED'}: {self.payload.get('message', '')}")

    @property
    def code(self) -> str | None:
        code = self.payload.get("code")
        return code if isinstance(code, str) else None

    @property
    def retryable(self) -> bool:
        return self.payload.get("retryable") is True


class ConnectionRefused(PolicyRefusedError):  # noqa: N818 (the contract's own word)
    """The handshake was refused for good: not retryable, or out of attempts."""


class EventRefused(PolicyRefusedError):  # noqa: N818 (the contract's own word)
    """An event was refused for good: not retryable, or out of attempts."""


def contract_payload(value: Any) -> Mapping[str, Any] | None:
    """The contract payload in a ``connect_error`` argument or an ack, if there is one.

    A refused namespace connect arrives as ``{"message": ..., "data": payload}``; the HTTP
    overload gate's JSON body (seen by the polling transport) and acks are the payload
    itself. A payload is recognised by its ``code`` and ``policy`` keys.
    """
    if not isinstance(value, Mapping):
        return None
    if "code" in value and "policy" in value:
        return value
    inner = value.get("data")
    if isinstance(inner, Mapping) and "code" in inner and "policy" in inner:
        return inner
    return None


def backoff_from(advice: Any) -> BackoffSpec | None:
    """The payload's ``backoff`` object as a spec, or ``None`` when absent or malformed.

    The advice crosses the network, so it is checked here as the compiler checks a policy:
    a malformed one is ignored in favour of the last good advice, never trusted blindly.
    """
    if not isinstance(advice, Mapping):
        return None
    try:
        strategy = BackoffStrategy(str(advice.get("strategy")))
    except ValueError:
        return None
    base_ms = _number(advice.get("base_ms"))
    max_ms = _number(advice.get("max_ms"))
    multiplier = _number(advice.get("multiplier", 2.0))
    attempts = advice.get("max_attempts")
    if base_ms is None or max_ms is None or multiplier is None:
        return None
    if not isinstance(attempts, int) or isinstance(attempts, bool):
        return None
    if base_ms < 0 or max_ms < 0 or attempts < 0 or multiplier < 1:
        return None
    return BackoffSpec(
        name="advised",
        strategy=strategy,
        base=base_ms / 1000.0,
        max=max_ms / 1000.0,
        max_attempts=attempts,
        multiplier=multiplier,
    )


class RetryPlan:
    """The waits of one retry sequence, following the server's latest advice.

    The attempt count runs on when the advice changes from one refusal to the next (a
    rate limit, then a shed), so a client that keeps being refused keeps backing off and
    finally gives up. Failures without advice (the server is unreachable) reuse the last
    advice, or :data:`DEFAULT_BACKOFF` before any.
    """

    __slots__ = ("_max_attempts", "_previous", "_rand", "attempt", "backoff")

    def __init__(
        self,
        *,
        rand: Random = random.random,
        max_attempts: int | None = None,
        fallback: BackoffSpec = DEFAULT_BACKOFF,
    ) -> None:
        self._rand = rand
        self._max_attempts = max_attempts
        self._previous: float | None = None
        self.attempt = 0
        self.backoff = fallback

    def next_delay(self, payload: Mapping[str, Any] | None = None) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up.

        ``max(retry_after_ms, backoff delay)``: ``retry_after_ms`` is when the server will
        accept the request at the earliest; the backoff spreads clients that were all
        refused at once, so their retries do not arrive together.
        """
        if payload is not None:
            self.backoff = backoff_from(payload.get("backoff")) or self.backoff
        self.attempt += 1
        spec = self.backoff
        if self._max_attempts is not None and self._max_attempts < spec.max_attempts:
            spec = dataclasses.replace(spec, max_attempts=self._max_attempts)
        delay = compute_delay(spec, self.attempt, self._rand, self._previous)
        if delay is None:
            return None
        self._previous = delay
        return max(delay, _retry_after(payload))


class ConnectRetries:
    """After each failed connect attempt: wait how long, or stop with what.

    Both connect helpers run the same loop (attempt, and on ``ConnectionError`` ask
    :meth:`after_failure`); only the sleeping differs.
    """

    __slots__ = ("_advised", "plan")

    def __init__(self, *, rand: Random, max_attempts: int | None) -> None:
        self.plan = RetryPlan(rand=rand, max_attempts=max_attempts)
        self._advised: Mapping[str, Any] | None = None

    def after_failure(
        self, refusals: list[Any], refused_namespaces: bool, error: BaseException
    ) -> float | ConnectionRefused | None:
        """The seconds to wait before the next attempt; a :class:`ConnectionRefused` to
        raise (from ``error``); or ``None`` to re-raise ``error`` itself (the server could
        not be reached, without advice, and the retries are spent).

        ``refusals`` is what :func:`record_trigger` recorded during the attempt;
        ``refused_namespaces`` whether the client counts a namespace as failed.
        """
        payload = _binding(refusals)
        # A retry the gate refuses at the handshake fails as a transport over a WebSocket,
        # whose refusal python-engineio does not read: the last advice holds.
        self._advised = payload or self._advised
        if payload is None and refused_namespaces:
            # Refused by a server that sent no advice: nothing says a retry would help.
            return ConnectionRefused(_raw(refusals))
        if payload is not None and payload.get("retryable") is not True:
            return ConnectionRefused(payload)
        delay = self.plan.next_delay(payload or self._advised)
        if delay is None:
            return ConnectionRefused(self._advised) if self._advised is not None else None
        _log.info(
            "connect attempt %d failed (%s); retrying in %.3fs",
            self.plan.attempt,
            payload.get("code") if payload is not None else error,
            delay,
        )
        return delay


class CallRetries:
    """After each ack of a call: return it, wait how long, or stop with what."""

    __slots__ = ("_event", "plan")

    def __init__(self, event: str, *, rand: Random, max_attempts: int | None) -> None:
        self._event = event
        self.plan = RetryPlan(rand=rand, max_attempts=max_attempts)

    def after_ack(self, answer: Any) -> float | None:
        """``None`` when ``answer`` is the handler's own (return it); else the seconds to
        wait before calling again. Raises :class:`EventRefused` when the refusal is final:
        not retryable, or the retries are spent.
        """
        payload = contract_payload(answer)
        if payload is None:
            return None
        if payload.get("retryable") is not True:
            raise EventRefused(payload)
        delay = self.plan.next_delay(payload)
        if delay is None:
            raise EventRefused(payload)
        _log.info(
            "%s refused (%s), attempt %d; retrying in %.3fs",
            self._event,
            payload.get("code"),
            self.plan.attempt,
            delay,
        )
        return delay


def connect_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``client.connect``, with python-socketio's own retry loop off: it
    waits on its own delays and never sees a refusal's data."""
    return {**options, "retry": False}


def record_trigger(
    client: Any, sink: list[Any], event: str, namespace: str | None, *args: Any
) -> None:
    """Record the refusal an event the client is about to dispatch carries, if any.

    ``connect`` raises only "One or more namespaces failed to connect", without the data;
    the data reaches nothing but the handlers. The helpers wrap the instance's
    ``_trigger_event`` (as the server adapter does, and ``sio.instrument()`` before it),
    which sees it for function handlers, class-based namespaces and no handler at all,
    and call this before the original, so the application's handlers still run.

    The advice of a refusal that ends the session (``refused`` on the advice namespace)
    ends the attempt at once: python-socketio's client would notice the closed session only
    at ``wait_timeout``.
    """
    if event == "connect_error":
        sink.append(args[0] if len(args) == 1 else list(args))
    elif event == ADVICE_EVENT and namespace == ADVICE_NAMESPACE and args:
        sink.append(args[0])
        pending = set(client.connection_namespaces) - set(client.namespaces)
        client.failed_namespaces.extend(sorted(pending - set(client.failed_namespaces)))
        client._connect_event.set()


def _binding(refusals: list[Any]) -> Mapping[str, Any] | None:
    """The refusal that decides, when several namespaces were refused at once.

    A final refusal anywhere ends the attempt; among retryable ones, the longest
    ``retry_after_ms`` is the earliest moment every namespace may accept.
    """
    payloads = [p for p in map(contract_payload, refusals) if p is not None]
    if not payloads:
        return None
    final = [p for p in payloads if p.get("retryable") is not True]
    if final:
        return final[0]
    return max(payloads, key=_retry_after)


def _raw(refusals: list[Any]) -> Mapping[str, Any]:
    data = refusals[-1] if refusals else None
    if isinstance(data, Mapping):
        return data
    return {"message": "" if data is None else str(data)}


def _retry_after(payload: Mapping[str, Any] | None) -> float:
    value = _number(payload.get("retry_after_ms")) if payload is not None else None
    return value / 1000.0 if value is not None and value > 0 else 0.0


def _number(value: Any) -> float | None:
    """A finite JSON number as a float: ``bool`` is an ``int`` in Python, never a duration."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
