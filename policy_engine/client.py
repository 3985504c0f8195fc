"""Helpers for python-socketio clients that honour the client contract.

A refusal from a policy-enforced server says whether to retry (``retryable``), how long to
wait at least (``retry_after_ms``) and how to spread further attempts (``backoff``). A client
that retries on its own schedule either hammers a server that asked for a pause or gives up
on one that would have let it in a second later. :func:`connect_with_policy` and
:func:`call_with_policy` wrap ``socketio.AsyncClient.connect`` and ``call`` so that every
retry waits ``max(retry_after_ms, the backoff delay for that attempt)``, with the same
formulas the server uses to explain its advice (:mod:`policy_engine.algorithms.backoff`).

python-socketio's own reconnection loop is not used for the handshake: it waits on its own
delays and cannot see the refusal's data. After a dropped connection it knows nothing of
the advice either, so clients that care create ``AsyncClient(reconnection=False)`` and call
:func:`connect_with_policy` again from their ``disconnect`` handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import socketio

from policy_engine.algorithms.backoff import Random, compute_delay
from policy_engine.core.admission import ADVICE_EVENT, ADVICE_NAMESPACE
from policy_engine.errors import PolicyEngineError
from policy_engine.language.model import BackoffSpec, BackoffStrategy

__all__ = [
    "DEFAULT_BACKOFF",
    "ConnectionRefused",
    "EventRefused",
    "PolicyRefusedError",
    "RetryPlan",
    "Sleep",
    "backoff_from",
    "call_with_policy",
    "connect_with_policy",
    "contract_payload",
]

Sleep = Callable[[float], Awaitable[object]]
"""Waits the given number of seconds; ``asyncio.sleep`` unless a test or an app injects one."""

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


async def connect_with_policy(
    client: socketio.AsyncClient,
    url: str,
    *,
    max_attempts: int | None = None,
    rand: Random = random.random,
    sleep: Sleep = asyncio.sleep,
    **connect_kwargs: Any,
) -> None:
    """Connect ``client`` to ``url``, retrying refusals only as the server advises.

    ``connect_kwargs`` go to ``client.connect`` (``transports``, ``auth``, ``namespaces``,
    ``wait_timeout``, ...), always with ``retry=False``. A refusal that is not retryable
    raises :class:`ConnectionRefused` at once; a retryable one is retried after
    ``max(retry_after_ms, backoff delay)``, up to the advice's ``max_attempts`` retries
    (fewer if ``max_attempts`` is given). When the server cannot be reached, the last
    advice (or :data:`DEFAULT_BACKOFF`) paces the retries and the last
    ``socketio.exceptions.ConnectionError`` is raised once they run out. The client's own
    ``connect_error`` handlers still run.
    """
    if client.connected:
        raise socketio.exceptions.ConnectionError("Already connected")
    connect_kwargs["retry"] = False
    plan = RetryPlan(rand=rand, max_attempts=max_attempts)
    advised: Mapping[str, Any] | None = None
    while True:
        refusals: list[Any] = []
        try:
            with _connect_errors(client, refusals):
                await client.connect(url, **connect_kwargs)
        except socketio.exceptions.ConnectionError as exc:
            payload = _binding(refusals)
            # A retry the gate refuses at the handshake fails as a transport over a
            # WebSocket, whose refusal python-engineio does not read: the last advice holds.
            advised = payload or advised
            if payload is None and client.failed_namespaces:
                # Refused by a server that sent no advice: nothing says a retry would help.
                raise ConnectionRefused(_raw(refusals)) from exc
            if payload is not None and payload.get("retryable") is not True:
                raise ConnectionRefused(payload) from exc
            delay = plan.next_delay(payload or advised)
            if delay is None:
                if advised is not None:
                    raise ConnectionRefused(advised) from exc
                raise
            _log.info(
                "connect attempt %d failed (%s); retrying in %.3fs",
                plan.attempt,
                payload.get("code") if payload is not None else exc,
                delay,
            )
            await sleep(delay)
        else:
            return


async def call_with_policy(
    client: socketio.AsyncClient,
    event: str,
    data: Any = None,
    *,
    namespace: str | None = None,
    timeout: float = 60.0,
    max_attempts: int | None = None,
    rand: Random = random.random,
    sleep: Sleep = asyncio.sleep,
) -> Any:
    """Emit ``event`` with an ack and return the ack; retry refusals as the server advises.

    An ack that is a contract payload (it has ``code`` and ``policy``) is a refusal: a
    retryable one is retried after ``max(retry_after_ms, backoff delay)``, up to the
    advice's ``max_attempts`` (or ``max_attempts``); otherwise :class:`EventRefused` is
    raised. A timeout (``socketio.exceptions.TimeoutError``) is not retried: the handler
    may have run, and only the application knows whether running it twice is safe.
    """
    plan = RetryPlan(rand=rand, max_attempts=max_attempts)
    while True:
        answer = await client.call(event, data, namespace=namespace, timeout=timeout)
        payload = contract_payload(answer)
        if payload is None:
            return answer
        if payload.get("retryable") is not True:
            raise EventRefused(payload)
        delay = plan.next_delay(payload)
        if delay is None:
            raise EventRefused(payload)
        _log.info(
            "%s refused (%s), attempt %d; retrying in %.3fs",
            event,
            payload.get("code"),
            plan.attempt,
            delay,
        )
        await sleep(delay)


@contextlib.contextmanager
def _connect_errors(client: socketio.AsyncClient, sink: list[Any]) -> Iterator[None]:
    """Record the ``connect_error`` data of one attempt without displacing app handlers,
    and the advice of a refusal that ends the session instead (it ends the attempt).

    ``connect`` raises only "One or more namespaces failed to connect", without the data;
    the data reaches nothing but the handlers. Wrapping the instance's ``_trigger_event``
    (as the server adapter does, and ``sio.instrument()`` before it) sees it for function
    handlers, class-based namespaces and no handler at all, and still calls them.
    """
    own = "_trigger_event" in vars(client)
    original: Callable[..., Awaitable[Any]] = client._trigger_event

    async def trigger(event: str, namespace: str | None = None, *args: Any) -> Any:
        if event == "connect_error":
            sink.append(args[0] if len(args) == 1 else list(args))
        elif event == ADVICE_EVENT and namespace == ADVICE_NAMESPACE and args:
            # A refusal retrying can fix: the server ends the session after this advice,
            # which python-socketio's client would notice only at ``wait_timeout``.
            sink.append(args[0])
            pending = set(client.connection_namespaces) - set(client.namespaces)
            client.failed_namespaces.extend(sorted(pending - set(client.failed_namespaces)))
            client._connect_event.set()
        return await original(event, namespace, *args)

    client._trigger_event = trigger
    try:
        yield
    finally:
        if own:
            client._trigger_event = original
        else:
            del client._trigger_event


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
