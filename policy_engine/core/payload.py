"""The one JSON object a refused or failed client receives, and the one place that builds it.

Every refusal, whatever refused it (a rule, the classifier, the handshake gate, the idle
reaper, connection recovery), reaches the client with the same keys in the same order, so
a client library reads one shape. The notices the engine writes itself (rather than a
rule's own ``code`` and ``message``) are catalogued here, so their wording has one home.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, NamedTuple, TypedDict

from policy_engine.algorithms.backoff import to_client
from policy_engine.language.model import BackoffSpec, Category, PolicySet


class ClientPayload(TypedDict):
    """The client contract; a dict at run time, so it is sent as built."""

    code: str
    category: str
    message: str
    retryable: bool
    retry_after_ms: int | None
    backoff: dict[str, Any] | None
    policy: str
    correlation_id: str


def new_correlation_id() -> str:
    """The id that ties what a client was told to the server's log line about it."""
    return uuid.uuid4().hex[:16]


def client_payload(
    *,
    code: str,
    category: Category,
    message: str,
    retryable: bool,
    retry_after: float | None,
    backoff: BackoffSpec | None,
    policy: str,
) -> ClientPayload:
    """The client contract's object; ``retry_after_ms`` is rounded up, never down.

    ``backoff`` is sent only when the refusal is retryable: advice on how to retry
    something that must not be retried would be read as an invitation.
    """
    return ClientPayload(
        code=code,
        category=category.value,
        message=message,
        retryable=retryable,
        retry_after_ms=None if retry_after is None else math.ceil(retry_after * 1000),
        backoff=to_client(backoff) if backoff is not None and retryable else None,
        policy=policy,
        correlation_id=new_correlation_id(),
    )


def backoff_for(policy: PolicySet, name: str | None = None) -> BackoffSpec | None:
    """The backoff a retryable refusal advises: the one named, else the policy's default."""
    return policy.backoff.get(name or policy.defaults.backoff)


def system_refusal(
    policy: PolicySet,
    rule: str,
    *,
    code: str,
    message: str,
    retry_after: float | None,
) -> ClientPayload:
    """A refusal for the server's sake (a breaker open, load shed): the client is not at
    fault and may retry, with the policy's default backoff. ``rule``: ``section/name``."""
    return client_payload(
        code=code,
        category=Category.SYSTEM,
        message=message,
        retryable=True,
        retry_after=retry_after,
        backoff=backoff_for(policy),
        policy=rule,
    )


class Notice(NamedTuple):
    """A refusal the engine words itself; ``message`` may hold ``str.format`` fields."""

    code: str
    category: Category
    message: str
    retryable: bool

    def payload(
        self,
        policy: str,
        *,
        retry_after: float | None = None,
        backoff: BackoffSpec | None = None,
        **fields: Any,
    ) -> ClientPayload:
        message = self.message.format(**fields) if fields else self.message
        return client_payload(
            code=self.code,
            category=self.category,
            message=message[:MAX_NOTICE_CHARS],
            retryable=self.retryable,
            retry_after=retry_after,
            backoff=backoff,
            policy=policy,
        )


MAX_NOTICE_CHARS = 300
"""A notice quoting client input (a schema error) is cut here: it goes back over the wire."""

# A ceiling on connections is temporary (others disconnect, the store comes back): the
# client is told when and how to retry, not to give up.
TOO_MANY_CONNECTIONS = Notice(
    "TOO_MANY_CONNECTIONS", Category.CONNECTION, "Connection limit reached ({ceiling}).", True
)
# The shared store did not answer and the policy says fail_closed: nothing was judged, so
# the client must not read it as a limit it reached.
STORE_UNAVAILABLE = Notice(
    "STORE_UNAVAILABLE",
    Category.SYSTEM,
    "The server cannot check its limits right now; retry shortly.",
    True,
)
PAYLOAD_TOO_LARGE = Notice(
    "PAYLOAD_TOO_LARGE", Category.CLIENT, "The event is larger than {max_bytes} bytes.", False
)
INVALID_PAYLOAD = Notice("INVALID_PAYLOAD", Category.CLIENT, "Invalid payload: {detail}", False)
PAYLOAD_TOO_COMPLEX = Notice(
    "PAYLOAD_TOO_COMPLEX",
    Category.CLIENT,
    "The event holds more than {max_values} values for the policy to check.",
    False,
)
INVALID_REQUEST = Notice("INVALID_REQUEST", Category.CLIENT, "Invalid handshake: {detail}", False)
FORBIDDEN = Notice("FORBIDDEN", Category.CONNECTION, "Not allowed.", False)
AUTH_BLOCKED = Notice(
    "AUTH_BLOCKED",
    Category.CONNECTION,
    "Too many failed sign-in attempts; try again later.",
    True,
)
AUTH_THROTTLED = Notice(
    "AUTH_THROTTLED",
    Category.CONNECTION,
    "Too many failed sign-in attempts; wait before retrying.",
    True,
)
IDLE_TIMEOUT = Notice(
    "IDLE_TIMEOUT",
    Category.CONNECTION,
    "Closed after a period without activity; reconnect when needed.",
    True,
)
RECOVERY_UNAVAILABLE = Notice(
    "RECOVERY_UNAVAILABLE",
    Category.CONNECTION,
    "Missed events can no longer be replayed; reload the conversation.",
    False,
)
# The server is stopping: the client did nothing wrong and is served elsewhere (or here
# again, once restarted) if it comes back after its advised delay.
SERVER_DRAINING = Notice(
    "SERVER_DRAINING",
    Category.SYSTEM,
    "The server is restarting; reconnect after the advised delay.",
    True,
)
CONNECTION_REFUSED = Notice(
    "CONNECTION_REFUSED", Category.CONNECTION, "The server refused the connection.", False
)
INTERNAL = Notice("INTERNAL", Category.SYSTEM, "An internal error occurred; retry later.", True)
PROTOCOL_INVALID = Notice("INVALID_REQUEST", Category.CLIENT, "Invalid request: {detail}.", False)
PROTOCOL_ERRORS = Notice(
    "INVALID_REQUEST", Category.CLIENT, "Closed after {count} malformed packets.", False
)
UNKNOWN_EVENT = Notice("UNKNOWN_EVENT", Category.CLIENT, "No handler serves this event.", False)


def store_unavailable(policy: PolicySet, rule: str, retry_after: float) -> ClientPayload:
    """The refusal of a call the shared store could not judge under ``fail_closed``."""
    return STORE_UNAVAILABLE.payload(rule, retry_after=retry_after, backoff=backoff_for(policy))
