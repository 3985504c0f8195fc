"""The compiled policy: frozen, slotted records of tuples and mappings.

Built once by the compiler and only read afterwards, so nothing is parsed on the request
path and one policy set is shared by every task without locks. Units are resolved
(seconds, bytes, :class:`Rate`, fractions). Field defaults are the policy format's
defaults, written only here. Equality ignores compiled programs, plans and source
locations: a rule keeps its identity, and its state across a hot reload, when only its
place in the file moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, Protocol

from policy_engine.errors import Location
from policy_engine.language.authentication import AuthenticationSpec
from policy_engine.language.contexts import Hook
from policy_engine.language.units import Rate


class Mode(StrEnum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


class StoreFailureMode(StrEnum):
    FAIL_OPEN = "fail_open"
    FAIL_CLOSED = "fail_closed"
    LOCAL = "local"


class EvalFailureMode(StrEnum):
    """What a rule does when its expression fails at run time (a missing key, a bad regex)."""

    FAIL_OPEN = "fail_open"  # the rule does not apply: nothing is refused because of it
    FAIL_CLOSED = "fail_closed"  # the rule applies: refuse rather than let through


FAIL_SAFE: Final = EvalFailureMode.FAIL_CLOSED
"""What a deny rule, a rate limit, a shedding rule or a breaker does when its expression
fails and neither the rule nor ``defaults.on_eval_error`` says otherwise: it applies, so a
value that breaks an expression can never switch the rule off. An allow rule and an error
rule do the opposite (they do not apply), which is just as safe for them."""


class Category(StrEnum):
    CONNECTION = "connection"
    EVENT_PROCESSING = "event_processing"
    SYSTEM = "system"
    CLIENT = "client"


class ErrorSeverity(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class BackoffStrategy(StrEnum):
    EXPONENTIAL = "exponential"
    FULL_JITTER = "full_jitter"
    EQUAL_JITTER = "equal_jitter"
    DECORRELATED_JITTER = "decorrelated_jitter"
    CONSTANT = "constant"


class RateAlgorithm(StrEnum):
    GCRA = "gcra"
    SLIDING_WINDOW = "sliding_window"
    FIXED_WINDOW = "fixed_window"


class Scope(StrEnum):
    GLOBAL = "global"
    LOCAL = "local"


class ShedAction(StrEnum):
    REJECT = "reject"
    DROP = "drop"
    DELAY = "delay"
    DISCONNECT = "disconnect"


class Priority(StrEnum):
    """Event and connection priorities; ``rank`` orders them, lowest first."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"

    rank: int  # set below: a plain attribute, read on every event without a lookup


for _rank, _priority in enumerate(Priority):
    _priority.rank = _rank


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class OverflowAction(StrEnum):
    DROP_LOWEST = "drop_lowest"
    DISCONNECT = "disconnect"


class Program(Protocol):
    """A compiled CEL expression, ready to evaluate against plain-dict contexts."""

    def evaluate(self, activation: Mapping[str, Any]) -> Any: ...


@dataclass(frozen=True, slots=True)
class Expression:
    """A CEL source with its compiled program; equal when the source and context are."""

    source: str
    context: str
    program: Program = field(compare=False, repr=False, hash=False)
    location: Location = field(compare=False, repr=False, hash=False, default=Location(""))
    # Derived from the source at compile time (see analysis.py) to skip evaluations:
    # the event names outside which the expression cannot be true (None: any name),
    # whether it is exactly that name test, and a plain ``variable.field`` it reads.
    event_names: frozenset[str] | None = field(default=None, compare=False, repr=False)
    is_name_test: bool = field(default=False, compare=False, repr=False)
    # With event_names set: the program for the rest of the condition, which reads less
    # context (often not ``event`` at all) and so converts less data per evaluation.
    residual: Program | None = field(default=None, compare=False, repr=False)
    path: tuple[str, str] | None = field(default=None, compare=False, repr=False)
    # True when the expression reads only ``conn`` and ``claims``: its value is fixed for
    # the life of a connection and can be computed once per connection.
    per_connection: bool = field(default=False, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DefaultsSpec:
    mode: Mode = Mode.ENFORCE
    on_store_error: StoreFailureMode = StoreFailureMode.FAIL_OPEN
    store_timeout: float = 0.02
    # Unset: each rule kind fails safe (see FAIL_SAFE); set: the policy's override.
    on_eval_error: EvalFailureMode | None = None
    backoff: str = "default"


@dataclass(frozen=True, slots=True)
class IdentitySpec:
    trusted_proxies: tuple[str, ...] = ()
    user_claim: str = "sub"
    user_param: str = "user_id"
    # A client-chosen user id is believed only when a policy says so (development).
    trust_client_user_id: bool = False
    conversation_param: str = "conversation_id"
    token_param: str = "token"
    # Every client-supplied identifier (user, conversation, query and header values) is
    # at most this long: longer ones are refused, never stored as keys or logged.
    max_identifier_length: int = 256
    # IPv6 clients are keyed by their network of this prefix: one holder of a /64 is one
    # address for per-IP limits.
    ipv6_prefix: int = 64


@dataclass(frozen=True, slots=True)
class BackoffSpec:
    name: str
    strategy: BackoffStrategy = BackoffStrategy.FULL_JITTER
    base: float = 0.5
    max: float = 30.0
    max_attempts: int = 10
    multiplier: float = 2.0


# Built in so that every policy can name them; a policy may redefine either.
BUILTIN_BACKOFF: Final[Mapping[str, BackoffSpec]] = MappingProxyType(
    {
        "default": BackoffSpec("default"),
        "progressive": BackoffSpec("progressive", BackoffStrategy.EXPONENTIAL, 1.0, 60.0),
    }
)


# What a client is told when an error rule has no ``message`` of its own.
DEFAULT_ERROR_MESSAGES: Final[Mapping[Category, str]] = MappingProxyType(
    {
        Category.CONNECTION: "The connection could not be established.",
        Category.EVENT_PROCESSING: "The event could not be processed.",
        Category.SYSTEM: "An internal error occurred; retry later.",
        Category.CLIENT: "The request was invalid.",
    }
)


@dataclass(frozen=True, slots=True)
class ErrorRuleSpec:
    """``message`` defaults by category (DEFAULT_ERROR_MESSAGES), ``backoff`` to the policy's."""

    name: str
    when: Expression
    category: Category
    code: str
    message: str
    backoff: str
    severity: ErrorSeverity = ErrorSeverity.ERROR
    retryable: bool = False
    retry_after: float | None = None
    alert: bool = False
    location: Location = field(compare=False, repr=False, default=Location(""))


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """``burst`` defaults to the rate's count, ``mode`` to the policy's."""

    name: str
    hook: Hook
    key: Expression
    rate: Rate
    burst: int
    mode: Mode
    algorithm: RateAlgorithm = RateAlgorithm.GCRA
    scope: Scope = Scope.GLOBAL
    when: Expression | None = None
    code: str = "RATE_LIMITED"
    message: str = "Too many requests; slow down."
    max_keys: int = 100_000
    key_label: bool = False
    on_eval_error: EvalFailureMode = FAIL_SAFE
    location: Location = field(compare=False, repr=False, default=Location(""))


@dataclass(frozen=True, slots=True)
class SlowCallSpec:
    over: float
    rate: float = 1.0


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """Exactly one of ``calls`` (count-based) or ``time`` (seconds, time-based) is set."""

    calls: int | None = None
    time: float | None = None


@dataclass(frozen=True, slots=True)
class CircuitBreakerSpec:
    name: str
    match: Expression
    mode: Mode
    failure_rate: float = 0.5
    window: WindowSpec = WindowSpec(calls=100)
    minimum_calls: int = 100
    open_for: float = 60.0
    half_open_calls: int = 10
    record_when: Expression | None = None
    slow_call: SlowCallSpec | None = None
    code: str = "SERVICE_UNAVAILABLE"
    message: str = "The service is temporarily unavailable; retry later."
    fallback: Mapping[str, Any] | None = None
    on_eval_error: EvalFailureMode = FAIL_SAFE
    location: Location = field(compare=False, repr=False, default=Location(""))


@dataclass(frozen=True, slots=True)
class SheddingRuleSpec:
    """``hook`` is None for action disconnect, which runs on the load sampler's tick."""

    name: str
    hook: Hook | None
    when: Expression
    action: ShedAction
    mode: Mode
    retry_after: float = 5.0
    delay: float = 0.0
    sustained_for: float = 0.0
    max_priority: Priority = Priority.LOW
    max_disconnects: int = 10
    code: str = "OVERLOADED"
    message: str = "The server is overloaded; retry later."
    on_eval_error: EvalFailureMode = FAIL_SAFE
    location: Location = field(compare=False, repr=False, default=Location(""))
    # The operands of ``when`` that read only ``load``, as one program (the compiler's
    # planner builds it): while it is false, so is ``when``, whatever the event.
    load_gate: Program | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class AuthFailureSpec:
    """Progressive delays for repeated authentication failures from one IP or user."""

    threshold: int = 3
    window: float = 900.0
    backoff: str = "progressive"
    block_after: int = 0
    codes: tuple[str, ...] = ("AUTH_FAILED",)


@dataclass(frozen=True, slots=True)
class OutboundSpec:
    max_queue: int = 1000
    on_overflow: OverflowAction = OverflowAction.DROP_LOWEST
    disconnect_after_drops: int = 100
    max_bytes: int = 16_000_000


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """How much Socket.IO protocol abuse one connection is allowed (see the schema)."""

    max_errors: int = 10
    max_depth: int = 32
    answer_unknown_events: bool = False


@dataclass(frozen=True, slots=True)
class AdmissionSpec:
    """The admission queue: how long a connect refused by a connect rate limit or a
    connection ceiling may wait for its turn (``0``: no queue, refused at once), and how
    many connects may wait at once in all."""

    max_wait: float = 0.0
    max_length: int = 1000


@dataclass(frozen=True, slots=True)
class ConnectionsSpec:
    max_total: int | None = None
    max_per_user: int | None = None
    max_per_ip: int | None = None
    idle_timeout: float | None = None
    priority: Expression | None = None
    auth_failures: AuthFailureSpec | None = None
    outbound: OutboundSpec = OutboundSpec()
    protocol: ProtocolSpec = ProtocolSpec()
    retry_after: float = 5.0
    queue: AdmissionSpec = AdmissionSpec()


@dataclass(frozen=True, slots=True)
class RecoverySpec:
    """``events`` names what is buffered for replay; a policy that names none replays none.

    A conversation's buffer keeps its newest ``buffer_events`` within ``max_buffer_bytes``;
    all buffers together keep within ``max_total_bytes`` (per process in memory, for every
    process on a shared store).
    """

    enabled: bool = True
    max_disconnection: float = 120.0
    buffer_events: int = 500
    max_buffer_bytes: int = 4_000_000
    max_total_bytes: int = 64_000_000
    events: tuple[str, ...] = ()


DRAIN_CLOSE_RATE = Rate(1000, 1.0)
"""Clients a drain lets go per second by default: 10,000 in 10 s."""


@dataclass(frozen=True, slots=True)
class DrainSpec:
    """How a server that was asked to stop (SIGTERM) lets its clients go.

    Readiness fails at once and new sessions are refused; after ``grace`` (for a load
    balancer to notice) every connected client is told to reconnect, after a random
    ``jitter`` at most and to ``reconnect_url`` when there is one, and its transport is
    closed, ``close_rate`` per second; the process exits by ``deadline`` whatever is left.
    """

    deadline: float = 30.0
    grace: float = 0.0
    close_rate: Rate = DRAIN_CLOSE_RATE
    jitter: float = 2.0
    reconnect_url: str | None = None


DECISION_LOG_MAX_BYTES = 100_000_000
"""Bytes a decision log file grows to before it is rotated, by default."""


@dataclass(frozen=True, slots=True)
class DecisionLogSpec:
    """The decision log: one JSON line per sampled decision, for audits and ``replay``.

    Opt-in (a policy without the section logs nothing). ``sample`` is the fraction of
    decisions written (a replay that must reproduce the live run needs all of them);
    ``path`` a file, rotated past ``max_bytes`` with ``backups`` old files kept, or ``-``
    for standard output. Secrets (tokens, authorization headers, cookies) are always
    masked; ``redact`` names more fields (``conn.headers.x-api-key``,
    ``event.payload.email``, ``claims.email``) whose values are masked too.
    """

    sample: float = 1.0
    path: str = "-"
    max_bytes: int = DECISION_LOG_MAX_BYTES
    backups: int = 5
    redact: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ThresholdSpec:
    """Hysteresis on one smoothed signal: above ``enter`` starts overload, at or below
    ``exit`` allows it to end; ``exit <= enter``, so the state cannot flap on one value."""

    enter: int
    exit: int


@dataclass(frozen=True, slots=True)
class OverloadSpec:
    """When ``load.overloaded`` is true: the signals that decide it, and its minimum hold.

    It becomes true when any signal with a threshold is above its ``enter``, and false
    again only when every one is at or below its ``exit`` and it has been true for
    ``min_hold`` seconds. A signal without a threshold is not considered.
    """

    loop_lag_avg_ms: ThresholdSpec | None = ThresholdSpec(enter=15000, exit=4000)
    events_per_second_avg: ThresholdSpec | None = None
    connects_per_second_avg: ThresholdSpec | None = None
    min_hold: float = 10.0

    def thresholds(self) -> tuple[tuple[str, ThresholdSpec], ...]:
        """The signals that decide ``load.overloaded``, by their ``load`` field name."""
        named = (
            ("loop_lag_avg_ms", self.loop_lag_avg_ms),
            ("events_per_second_avg", self.events_per_second_avg),
            ("connects_per_second_avg", self.connects_per_second_avg),
        )
        return tuple((name, spec) for name, spec in named if spec is not None)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """How the load sampler smooths its signals and when it calls the server overloaded.

    The ``*_avg`` signals are exponentially weighted moving averages with time constant
    ``window`` (seconds), weighted by the time each sample covers: a stall or a burst much
    shorter than the window moves them by a fraction of its size, a sustained one fully.
    """

    window: float = 10.0
    overloaded: OverloadSpec = OverloadSpec()


@dataclass(frozen=True, slots=True)
class EventSpec:
    name: str
    max_bytes: int | None = None
    priority: Priority = Priority.NORMAL
    schema_path: str | None = None
    schema: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    validate: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class AuthzRuleSpec:
    """``on_eval_error`` defaults by effect (see :func:`authz_failure_default`)."""

    name: str
    hook: Hook
    when: Expression
    effect: Effect
    mode: Mode
    code: str = "FORBIDDEN"
    message: str = "Not allowed."
    on_eval_error: EvalFailureMode = FAIL_SAFE
    location: Location = field(compare=False, repr=False, default=Location(""))


def authz_failure_default(effect: Effect) -> EvalFailureMode:
    """A deny rule that cannot be evaluated refuses; an allow rule then allows nothing."""
    return FAIL_SAFE if effect is Effect.DENY else EvalFailureMode.FAIL_OPEN


@dataclass(frozen=True, slots=True)
class AuthorizationSpec:
    default: Effect = Effect.ALLOW
    rules: tuple[AuthzRuleSpec, ...] = ()


# -- plans: what the compiler derives from the sections so a decision visits only its rules


@dataclass(frozen=True, slots=True)
class HookIndex:
    """The rules of each section grouped by hook, so a decision visits only its own.

    Rate limits are also grouped by event name: a limit whose condition starts with an
    event-name test can never apply to other events, so for those it is not even visited.
    """

    rate_limits: Mapping[Hook, tuple[RateLimitSpec, ...]]
    shedding: Mapping[Hook | None, tuple[SheddingRuleSpec, ...]]
    authorization: Mapping[Hook, tuple[AuthzRuleSpec, ...]]
    # Per hook: the limits for each event name that some limit names, and for all others.
    rate_limits_by_event: Mapping[
        Hook, tuple[Mapping[str, tuple[RateLimitSpec, ...]], tuple[RateLimitSpec, ...]]
    ]

    def limits_or_sheds(self, hook: Hook) -> bool:
        """Whether any rate limit or shedding rule acts at ``hook`` (emit has none by default)."""
        return bool(self.rate_limits[hook] or self.shedding[hook])

    def rate_limits_for(self, hook: Hook, event_name: str) -> tuple[RateLimitSpec, ...]:
        named, others = self.rate_limits_by_event[hook]
        return named.get(event_name, others)


@dataclass(frozen=True, slots=True)
class EventPlan:
    """The rules the event hook can apply to one event name, in policy order.

    Rules whose condition starts with a test for other event names, and shedding rules
    whose ``max_priority`` is below the event's priority, can never apply to it: leaving
    them out here means a decision does not even visit them. Order is kept, so the first
    matching authorization rule still wins.
    """

    spec: EventSpec
    priority: str
    shedding: tuple[SheddingRuleSpec, ...]
    authorization: tuple[AuthzRuleSpec, ...]
    rate_limits: tuple[RateLimitSpec, ...]
    breakers: tuple[CircuitBreakerSpec, ...]
    # Nothing to evaluate but the size and the shedding rules (which are armed only under
    # load): no payload schema, no authorization rule, the default allow, no breaker.
    plain: bool = False
    shedding_names: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class EventPlans:
    """One :class:`EventPlan` per event name the policy mentions, and one for all others.

    Names come only from the policy (its ``events`` and the names its conditions test), so
    the map stays bounded however many different names clients send.
    """

    named: Mapping[str, EventPlan]
    other: EventPlan

    def __getitem__(self, name: str) -> EventPlan:
        return self.named.get(name, self.other)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """One compiled policy file; ``version`` is the content hash of what was compiled.

    The plans (``by_hook``, ``event_plans``, ``reads_connection_age``) are derived from the
    sections by the compiler's planner and take no part in equality.
    """

    version: str
    source: str
    defaults: DefaultsSpec
    identity: IdentitySpec
    errors: tuple[ErrorRuleSpec, ...]
    backoff: Mapping[str, BackoffSpec]
    rate_limits: tuple[RateLimitSpec, ...]
    circuit_breakers: tuple[CircuitBreakerSpec, ...]
    shedding: tuple[SheddingRuleSpec, ...]
    connections: ConnectionsSpec
    recovery: RecoverySpec
    events: Mapping[str, EventSpec]
    authorization: AuthorizationSpec
    default_event: EventSpec
    authentication: AuthenticationSpec = field(default_factory=AuthenticationSpec)
    drain: DrainSpec = field(default_factory=DrainSpec)
    load: LoadSpec = field(default_factory=LoadSpec)
    decision_log: DecisionLogSpec | None = None
    by_hook: HookIndex = field(compare=False, repr=False, kw_only=True)
    event_plans: EventPlans = field(compare=False, repr=False, kw_only=True)
    # Whether any expression reads ``conn.connected_ms``: only then is it kept current on
    # every event (disconnect shedding refreshes it itself).
    reads_connection_age: bool = field(compare=False, repr=False, kw_only=True)

    def event(self, name: str) -> EventSpec:
        return self.events.get(name, self.default_event)
