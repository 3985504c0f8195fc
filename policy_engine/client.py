"""Helpers for python-socketio clients that honour the client contract.

A refusal from a policy-enforced server says whether to retry (``retryable``), how long to
wait at least (``retry_after_ms``) and how to spread further attempts (``backoff``). A client
that retries on its own schedule either hammers a server that asked for a pause or gives up
on one that would have let it in a second later. :func:`connect_with_policy` and
:func:`call_with_policy` wrap ``socketio.AsyncClient.connect`` and ``call`` so that every
retry waits ``max(retry_after_ms, the backoff delay for that attempt)``, with the same
formulas the server uses to explain its advice (:mod:`policy_engine.algorithms.backoff`).
:func:`connect_with_policy_sync` and :func:`call_with_policy_sync` do the same for
``socketio.Client`` (:mod:`policy_engine.client_sync`); both pairs decide through
:mod:`policy_engine.client_retry`.

python-socketio's own reconnection loop is not used for the handshake: it waits on its own
delays and cannot see the refusal's data. After a dropped connection it knows nothing of
the advice either, so clients that care create ``AsyncClient(reconnection=False)`` and call
:func:`connect_with_policy` again from their ``disconnect`` handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import socketio

from policy_engine.algorithms.backoff import Random
from policy_engine.client_retry import (
    DEFAULT_BACKOFF,
    CallRetries,
    ConnectionRefused,
    ConnectRetries,
    EventRefused,
    PolicyRefusedError,
    RetryPlan,
    backoff_from,
    connect_options,
    contract_payload,
    record_trigger,
)
from policy_engine.client_sync import call_with_policy_sync, connect_with_policy_sync

__all__ = [
    "DEFAULT_BACKOFF",
    "ConnectionRefused",
    "EventRefused",
    "PolicyRefusedError",
    "RetryPlan",
    "Sleep",
    "backoff_from",
    "call_with_policy",
    "call_with_policy_sync",
    "connect_with_policy",
    "connect_with_policy_sync",
    "contract_payload",
]

Sleep = Callable[[float], Awaitable[object]]
"""Waits the given number of seconds; ``asyncio.sleep`` unless a test or an app injects one."""


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
    ``wait_timeout``, ...), always with python-socketio's own retry off. A refusal that is
    not retryable raises :class:`ConnectionRefused` at once; a retryable one is retried
    after ``max(retry_after_ms, backoff delay)``, up to the advice's ``max_attempts``
    retries (fewer if ``max_attempts`` is given). When the server cannot be reached, the
    last advice (or :data:`DEFAULT_BACKOFF`) paces the retries and the last
    ``socketio.exceptions.ConnectionError`` is raised once they run out. The client's own
    ``connect_error`` handlers still run.
    """
    if client.connected:
        raise socketio.exceptions.ConnectionError("Already connected")
    options = connect_options(connect_kwargs)
    retries = ConnectRetries(rand=rand, max_attempts=max_attempts)
    while True:
        refusals: list[Any] = []
        try:
            with _connect_errors(client, refusals):
                await client.connect(url, **options)
        except socketio.exceptions.ConnectionError as exc:
            outcome = retries.after_failure(refusals, bool(client.failed_namespaces), exc)
            if isinstance(outcome, ConnectionRefused):
                raise outcome from exc
            if outcome is None:
                raise
            await sleep(outcome)
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
    retries = CallRetries(event, rand=rand, max_attempts=max_attempts)
    while True:
        answer = await client.call(event, data, namespace=namespace, timeout=timeout)
        delay = retries.after_ack(answer)
        if delay is None:
            return answer
        await sleep(delay)


@contextlib.contextmanager
def _connect_errors(client: socketio.AsyncClient, sink: list[Any]) -> Iterator[None]:
    """Record the refusals of one attempt (:func:`~policy_engine.client_retry.record_trigger`)
    without displacing the application's handlers; the client is left as it was."""
    own = "_trigger_event" in vars(client)
    original: Callable[..., Awaitable[Any]] = client._trigger_event

    async def trigger(event: str, namespace: str | None = None, *args: Any) -> Any:
        record_trigger(client, sink, event, namespace, *args)
        return await original(event, namespace, *args)

    client._trigger_event = trigger
    try:
        yield
    finally:
        if own:
            client._trigger_event = original
        else:
            del client._trigger_event
