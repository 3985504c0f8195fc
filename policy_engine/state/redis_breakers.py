"""Circuit breakers shared through Redis, each operation one script that Redis runs whole.

Reading a breaker's state, deciding in Python and writing it back loses outcomes when
several processes record at once, or spends round trips retrying a compare-and-set. Here
:func:`~policy_engine.algorithms.breaker.acquire`, :func:`~policy_engine.algorithms.breaker.record`
and :func:`~policy_engine.algorithms.breaker.release` run in Redis, transcribed to Lua in
:mod:`policy_engine.state.redis_breaker_scripts` (which also describes the stored hash), so
every outcome counts and each operation costs one script run.

:class:`RedisBreakers` does not run the scripts: each method hands back the :class:`Call`
to run and the function that turns its reply into what the pure algorithm returns, so a
caller can send many decisions in one batch through
:class:`~policy_engine.state.redis_pipeline.Pipeline` (or run a call alone with
``await call.script(keys=call.keys, args=call.plain_args)``). Redis failures are left to the
caller to translate.

``now`` is the caller's seconds, every process's comparable with every other's, or
``None`` for Redis's own clock, which needs no agreement between the processes' clocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from policy_engine.algorithms.breaker import (
    BreakerState,
    Circuit,
    CountWindow,
    Permit,
    Reason,
    TimeWindow,
    Transition,
)
from policy_engine.language.model import CircuitBreakerSpec
from policy_engine.state import redis_breaker_scripts as scripts
from policy_engine.state.redis_clients import RedisClient
from policy_engine.state.redis_pipeline import Arg, Call, SpecArgs, Words

_CLOSED = BreakerState()

# A count window's outcome digits (``failed + 2 * slow``) as the binary digits of each set.
_FAILED_FLAGS = bytes.maketrans(b"0123", b"0101")
_SLOW_FLAGS = bytes.maketrans(b"0123", b"0011")


class RedisBreakers:
    """The breakers under ``{prefix}:cb:{rule}`` in the Redis of ``client``."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        register = client.register_script
        self._acquire = register(scripts.ACQUIRE)
        self._record = register(scripts.RECORD)
        self._record_many = register(scripts.RECORD_MANY)
        self._release = register(scripts.RELEASE)
        self._read = register(scripts.READ)
        self._spec_args = SpecArgs[CircuitBreakerSpec](_own_args)

    def __repr__(self) -> str:
        return f"RedisBreakers(prefix={self.prefix!r})"

    def key(self, name: str) -> str:
        return f"{self.prefix}:cb:{name}"

    def acquire(
        self, spec: CircuitBreakerSpec, now: float | None
    ) -> tuple[Call, Callable[[Any], Permit]]:
        """Ask to make one call, as :func:`~policy_engine.algorithms.breaker.acquire`."""
        return Call(self._acquire, [self.key(spec.name)], self._args(spec, now)), read_permit

    def record(
        self, spec: CircuitBreakerSpec, now: float | None, *, failed: bool, duration: float
    ) -> tuple[Call, Callable[[Any], Transition | None]]:
        """Report a permitted call's outcome, as :func:`~policy_engine.algorithms.breaker.record`.

        Raises ValueError at once for a spec with neither ``window.calls`` nor
        ``window.time``, which the compiler never builds.
        """
        if spec.window.calls is None and spec.window.time is None:
            raise ValueError(
                f"circuit breaker {spec.name!r} has neither window.calls nor window.time"
            )
        args = [*self._args(spec, now), "1" if failed else "0", _number(duration)]
        return Call(self._record, [self.key(spec.name)], args), _transition

    def record_many(
        self, spec: CircuitBreakerSpec, outcomes: Sequence[tuple[float | None, bool, float]]
    ) -> tuple[Call, Callable[[Any], list[Transition | None]]]:
        """Report several calls' outcomes ``(now, failed, duration)`` in turn, as many
        :meth:`record` calls would; the reply read is each one's transition, in order."""
        if spec.window.calls is None and spec.window.time is None:
            raise ValueError(
                f"circuit breaker {spec.name!r} has neither window.calls nor window.time"
            )
        args: list[Arg | Words] = ["", self._spec_args(spec), len(outcomes)]
        for now, failed, duration in outcomes:
            args += ("" if now is None else _number(now), "1" if failed else "0", _number(duration))
        call = Call(self._record_many, [self.key(spec.name)], args)
        return call, _transitions

    def release(self, spec: CircuitBreakerSpec) -> tuple[Call, Callable[[Any], None]]:
        """Give back a permit whose call never ran, as ``breaker.release``."""
        return Call(self._release, [self.key(spec.name)], []), _nothing

    def _args(self, spec: CircuitBreakerSpec, now: float | None) -> list[Arg | Words]:
        """``ARGV[1]`` to ``ARGV[9]``: ``now``, then the spec's own, kept per spec."""
        return ["" if now is None else _number(now), self._spec_args(spec)]

    def fetch_state(self, name: str) -> tuple[Call, Callable[[Any], BreakerState]]:
        """Read the breaker's stored state (closed and empty when none): for status pages."""
        return Call(self._read, [self.key(name)], []), _state


def _spec_args(spec: CircuitBreakerSpec, now: float | None) -> list[Arg]:
    """``ARGV[1]`` to ``ARGV[9]`` of the acquire and record scripts: ``now``, then the spec."""
    window = spec.window
    slow_call = spec.slow_call
    return [
        "" if now is None else _number(now),
        "" if window.calls is None else str(window.calls),
        "" if window.time is None else _number(window.time),
        str(spec.minimum_calls),
        _number(spec.failure_rate),
        "" if slow_call is None else _number(slow_call.over),
        "" if slow_call is None else _number(slow_call.rate),
        _number(spec.open_for),
        str(spec.half_open_calls),
    ]


def _own_args(spec: CircuitBreakerSpec) -> tuple[Arg, ...]:
    """``ARGV[2]`` to ``ARGV[9]``: the spec's own, the same on every call."""
    return tuple(_spec_args(spec, None)[1:])


def read_permit(reply: Sequence[Any]) -> Permit:
    """The Permit ``breaker.acquire`` returns, from ``{permitted, circuit, now, until, opened}``."""
    permitted, circuit, now, until, opened = reply
    if permitted == 1 and opened != 1:
        return Permit(True, 0.0, Circuit(_text(circuit)))
    at = float(now)
    if permitted != 1:
        return Permit(False, _retry_after(at, float(until)), Circuit(_text(circuit)))
    transition = Transition(Circuit.OPEN, Circuit.HALF_OPEN, Reason.OPEN_FOR_ELAPSED, at)
    return Permit(True, 0.0, Circuit.HALF_OPEN, transition)


def _transition(reply: Sequence[Any] | None) -> Transition | None:
    """The record script's ``{from, to, reason, at}``, or nothing, as ``breaker.record``'s."""
    if reply is None:
        return None
    from_state, to_state, reason, at = reply
    return Transition(
        Circuit(_text(from_state)), Circuit(_text(to_state)), Reason(_text(reason)), float(at)
    )


def _transitions(reply: Sequence[Any]) -> list[Transition | None]:
    return [_transition(each) for each in reply]


def _nothing(_reply: Any) -> None:
    return None


def _state(reply: Sequence[Any]) -> BreakerState:
    """The read script's flattened state as the algorithm's :class:`BreakerState`."""
    circuit, since, permits, kind, calls, failed, slow, entries = reply
    window: CountWindow | TimeWindow | None = None
    match _text(kind):
        case "calls":
            flags = entries.encode() if isinstance(entries, str) else entries
            window = CountWindow(
                int(calls),
                _bits(flags.translate(_FAILED_FLAGS)),
                _bits(flags.translate(_SLOW_FLAGS)),
            )
        case "time":
            buckets = tuple(
                (
                    int(float(entries[i])),
                    int(entries[i + 1]),
                    int(entries[i + 2]),
                    int(entries[i + 3]),
                )
                for i in range(0, len(entries), 4)
            )
            window = TimeWindow(buckets, int(calls), int(failed), int(slow))
    return BreakerState(Circuit(_text(circuit)), float(since), window, int(permits))


def _bits(digits: bytes) -> int:
    """The bit set whose binary digits these are, the last one bit 0."""
    return int(digits, 2) if digits else 0


def _retry_after(now: float, at: float) -> float:
    """``at - now`` rounded up just enough that ``now + wait >= at`` holds in floats.

    The rule of :func:`~policy_engine.algorithms.breaker.acquire`'s ``retry_after`` (a call
    at ``now + retry_after`` gets through), applied here because Lua has no ``nextafter``.
    """
    wait = at - now
    while now + wait < at:
        wait = math.nextafter(wait, math.inf)
    return wait


def _number(value: float) -> str:
    """A float as the scripts parse it back to the very same double (``inf`` included)."""
    return repr(float(value))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
