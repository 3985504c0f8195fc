"""The client helpers for python-socketio's synchronous ``socketio.Client``.

Scripts, workers and Flask-era code that use the threaded client deserve the same
contract as asyncio code: every retry waits ``max(retry_after_ms, backoff delay)`` and a
final refusal raises with its payload. These are :func:`policy_engine.client.connect_with_policy`
and :func:`policy_engine.client.call_with_policy` without ``await``: both pairs decide through
:mod:`policy_engine.client_retry`, so they retry on the same terms.

Create the client with ``socketio.Client(reconnection=False)`` and call
:func:`connect_with_policy_sync` again from the ``disconnect`` handler when a dropped
connection should come back: python-socketio's reconnection loop knows nothing of the advice.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import socketio

from policy_engine.algorithms.backoff import Random
from policy_engine.client_retry import (
    CallRetries,
    ConnectionRefused,
    ConnectRetries,
    connect_options,
    record_trigger,
)

__all__ = ["SyncSleep", "call_with_policy_sync", "connect_with_policy_sync"]

SyncSleep = Callable[[float], object]
"""Waits the given number of seconds; ``time.sleep`` unless a test or an app injects one."""


def connect_with_policy_sync(
    client: socketio.Client,
    url: str,
    *,
    max_attempts: int | None = None,
    rand: Random = random.random,
    sleep: SyncSleep = time.sleep,
    **connect_kwargs: Any,
) -> None:
    """Connect ``client`` to ``url``, retrying refusals only as the server advises.

    The terms of :func:`policy_engine.client.connect_with_policy`: a refusal that is not
    retryable raises :class:`~policy_engine.client_retry.ConnectionRefused` at once, a
    retryable one is retried after ``max(retry_after_ms, backoff delay)`` up to the advice's
    ``max_attempts``, and an unreachable server is retried on the last advice (or the
    default) until the last ``socketio.exceptions.ConnectionError`` is raised.
    """
    if client.connected:
        raise socketio.exceptions.ConnectionError("Already connected")
    options = connect_options(connect_kwargs)
    retries = ConnectRetries(rand=rand, max_attempts=max_attempts)
    while True:
        refusals: list[Any] = []
        try:
            with _connect_errors(client, refusals):
                client.connect(url, **options)
        except socketio.exceptions.ConnectionError as exc:
            outcome = retries.after_failure(refusals, bool(client.failed_namespaces), exc)
            if isinstance(outcome, ConnectionRefused):
                raise outcome from exc
            if outcome is None:
                raise
            sleep(outcome)
        else:
            return


def call_with_policy_sync(
    client: socketio.Client,
    event: str,
    data: Any = None,
    *,
    namespace: str | None = None,
    timeout: float = 60.0,
    max_attempts: int | None = None,
    rand: Random = random.random,
    sleep: SyncSleep = time.sleep,
) -> Any:
    """Emit ``event`` with an ack and return the ack; retry refusals as the server advises.

    The terms of :func:`policy_engine.client.call_with_policy`: a retryable refusal in the
    ack is retried after ``max(retry_after_ms, backoff delay)``, any other raises
    :class:`~policy_engine.client_retry.EventRefused`, and a timeout is never retried.
    """
    retries = CallRetries(event, rand=rand, max_attempts=max_attempts)
    while True:
        answer = client.call(event, data, namespace=namespace, timeout=timeout)
        delay = retries.after_ack(answer)
        if delay is None:
            return answer
        sleep(delay)


@contextlib.contextmanager
def _connect_errors(client: socketio.Client, sink: list[Any]) -> Iterator[None]:
    """Record the refusals of one attempt without displacing the application's handlers.

    The synchronous client dispatches on its reading thread, so the wrapper records from
    there; ``connect`` reads ``sink`` only after it has returned or raised.
    """
    own = "_trigger_event" in vars(client)
    original: Callable[..., Any] = client._trigger_event

    def trigger(event: str, namespace: str | None = None, *args: Any) -> Any:
        record_trigger(client, sink, event, namespace, *args)
        return original(event, namespace, *args)

    client._trigger_event = trigger
    try:
        yield
    finally:
        if own:
            client._trigger_event = original
        else:
            del client._trigger_event
