"""The admission queue: a connect that meets a connect rate limit or a connection ceiling
waits for its turn instead of being refused.

A reconnect storm meets the connect rate limit all at once; refusing the surplus sends
every client into its own backoff, and they come back later than the server could have
taken them. Here a refused connect joins a line (one per rule and key, so a per-IP ceiling
never holds up another address), waits until it is first, and is judged again when its
turn can come: after the rate limit's own retry time, or as soon as a connection of this
process is released. The policy bounds the queue: ``max_length`` connects wait in all,
none beyond ``max_wait``. A connect the bounds cannot hold is refused at once and told to
come back when the line can take it: those waiting, divided by the rate the line admits
(measured over the last ``WINDOW`` seconds; before two admissions, the rate the refusal's
own retry time implies).

A line also remembers its last refusal until its retry time (a ceiling: until a
connection is released), so the handshake gate can refuse at the HTTP request, at no cost,
what the namespace connect would refuse anyway. The queue is per process and lives on the
event loop; time comes from ``clock`` so the arithmetic is testable without waiting.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from policy_engine.language.model import AdmissionSpec

ADVICE_NAMESPACE = "/policy-engine"
"""The namespace whose :data:`ADVICE_EVENT` carries the advice of a connect refusal that
ends the session (a namespace no client joins: plain clients ignore it)."""

ADVICE_EVENT = "refused"

LineKey = tuple[str, str]
"""A line: the refusing rule (``rate_limits/connect-global``, ``connections/max_total``)
and the key it refused under (the rate limit's key, the address, the user; ``""``)."""

WINDOW = 10.0
"""Seconds of admissions a line's rate is measured over."""

MAX_IDLE_LINES = 10_000
"""Lines kept with nobody waiting (for their rate and their refusal), at most."""


class Line:
    """The connects waiting on one rule and key, in order, and what the line last told."""

    __slots__ = ("admitted", "ceiling", "refusal", "refused_until", "tickets")

    def __init__(self, ceiling: bool) -> None:
        self.tickets: deque[Ticket] = deque()
        self.admitted: deque[float] = deque()
        # A ceiling line's first waiter is woken by a release; a rate line's waits its time.
        self.ceiling = ceiling
        self.refusal: Mapping[str, Any] | None = None
        self.refused_until = 0.0

    def rate(self, hint: float, now: float) -> float:
        """Admissions per second: measured when the line admitted twice within the window,
        else one per ``hint`` seconds (the refusal's retry time)."""
        admitted = self.admitted
        while admitted and admitted[0] < now - WINDOW:
            admitted.popleft()
        if len(admitted) >= 2:
            span = max(now - admitted[0], 1e-3)
            return len(admitted) / span
        return 1.0 / max(hint, 1e-3)


class Ticket:
    """One connect's place in a line; ``leave`` gives it up, once, whatever ended it."""

    __slots__ = ("_event", "_first", "_left", "key", "line", "queue", "session")

    def __init__(self, queue: AdmissionQueue, key: LineKey, line: Line, session: str) -> None:
        self.queue = queue
        self.key = key
        self.line = line
        self.session = session
        self._event = asyncio.Event()
        self._first = False
        self._left = False

    @property
    def left(self) -> bool:
        return self._left

    async def turn(self, pause: float, deadline: float) -> bool:
        """Wait to be first in line, then ``pause`` (a ceiling line: until a release, at
        most ``pause``); False when ``deadline`` (on the queue's clock) came first or the
        place was given up meanwhile."""
        clock = self.queue.clock
        while not self._first and not self._left:
            if not await self._wait(deadline - clock()):
                return False
        remaining = deadline - clock()
        if self._left or remaining <= 0:
            return False
        await self._wait(min(pause, remaining))
        return not self._left

    async def _wait(self, seconds: float) -> bool:
        """Until poked (True) or ``seconds`` passed (False)."""
        event = self._event
        event.clear()
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await event.wait()
        except TimeoutError:
            return False
        return True

    def admitted(self) -> None:
        """The connect was let in: it counts towards the line's rate, and leaves."""
        self.line.admitted.append(self.queue.clock())
        self.leave()

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        self._event.set()
        queue, line = self.queue, self.line
        queue.waiting -= 1
        if queue.sessions.get(self.session) is self:
            del queue.sessions[self.session]
        first = bool(line.tickets) and line.tickets[0] is self
        line.tickets.remove(self)
        if first and line.tickets:
            line.tickets[0].make_first()

    def make_first(self) -> None:
        self._first = True
        self._event.set()

    def poke(self) -> None:
        self._event.set()


class AdmissionQueue:
    """Every line of this process; the adapter joins them, the handshake gate reads them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.waiting = 0
        self._lines: dict[LineKey, Line] = {}
        # The lines a handshake can be matched to before its namespace connect: by scope,
        # ``""`` for lines every client joins, ``ip:<address>`` for one address's.
        self._by_scope: dict[str, set[LineKey]] = {}
        # The place each waiting session holds, so a session that ends gives it up at once.
        self.sessions: dict[str, Ticket] = {}

    def lines(self) -> Iterator[tuple[LineKey, Line]]:
        return iter(self._lines.items())

    def line(self, key: LineKey) -> Line | None:
        return self._lines.get(key)

    def _line(self, key: LineKey) -> Line:
        line = self._lines.get(key)
        if line is None:
            if len(self._lines) >= MAX_IDLE_LINES:
                self._prune()
            line = self._lines[key] = Line(key[0].startswith("connections/"))
        return line

    def wait_for(self, key: LineKey, hint: float) -> float:
        """How long a connect joining the line now would wait for its turn, in seconds:
        those waiting and itself, at the line's rate; never less than ``hint``."""
        line = self._lines.get(key)
        if line is None:
            return hint
        now = self.clock()
        return max(hint, (len(line.tickets) + 1) / line.rate(hint, now))

    def join(
        self, key: LineKey, spec: AdmissionSpec, hint: float, max_wait: float, session: str
    ) -> Ticket | float:
        """A place in the line for ``session``, or (the bounds cannot hold it) the seconds
        after which to retry. ``hint``: the refusal's own retry time; ``max_wait``: what is
        left of the connect's own bound."""
        if spec.max_wait <= 0:
            return self.wait_for(key, hint)
        wait = self.wait_for(key, hint)
        if self.waiting >= spec.max_length or wait > max_wait:
            return wait
        line = self._line(key)
        ticket = Ticket(self, key, line, session)
        line.tickets.append(ticket)
        self.sessions[session] = ticket
        self.waiting += 1
        if len(line.tickets) == 1:
            ticket.make_first()
        return ticket

    def refused(
        self,
        key: LineKey,
        payload: Mapping[str, Any],
        retry_after: float,
        scope: str | None,
    ) -> None:
        """Remember a refusal on the line until ``retry_after`` seconds from now (a ceiling:
        or until a release); with a ``scope``, the gate repeats it at the HTTP request."""
        line = self._line(key)
        line.refusal = payload
        line.refused_until = self.clock() + retry_after
        if scope is not None:
            self._by_scope.setdefault(scope, set()).add(key)

    @property
    def has_gate_lines(self) -> bool:
        """Whether any line may refuse a handshake at the gate (a cheap test per request)."""
        return bool(self._by_scope)

    def gate_refusal(self, scopes: tuple[str, ...]) -> tuple[Mapping[str, Any], float] | None:
        """The refusal standing on a line of these scopes with the most time left, if any."""
        found: tuple[Mapping[str, Any], float] | None = None
        for scope in scopes:
            keys = self._by_scope.get(scope)
            if not keys:
                continue
            for key in list(keys):
                standing = self.refusal(key)
                if standing is None:
                    keys.discard(key)
                elif found is None or standing[1] > found[1]:
                    found = standing
            if not keys:
                del self._by_scope[scope]
        return found

    def refusal(self, key: LineKey) -> tuple[Mapping[str, Any], float] | None:
        """The refusal the line still stands by and the seconds it has left, if any."""
        line = self._lines.get(key)
        if line is None or line.refusal is None:
            return None
        left = line.refused_until - self.clock()
        if left <= 0:
            line.refusal = None
            return None
        return line.refusal, left

    def released(self) -> None:
        """A connection of this process ended: ceiling lines may take their next connect."""
        for line in self._lines.values():
            if line.ceiling:
                line.refusal = None
                if line.tickets:
                    line.tickets[0].poke()

    def abandon(self, session: str) -> None:
        """The session ended while it waited: its place is given up now, not at its turn."""
        ticket = self.sessions.get(session)
        if ticket is not None:
            ticket.leave()

    def _prune(self) -> None:
        now = self.clock()
        for key, line in list(self._lines.items()):
            if not line.tickets and line.refused_until <= now:
                del self._lines[key]


def retry_after_ms(seconds: float) -> int:
    """The payload's ``retry_after_ms`` for a wait in seconds: rounded up, never down."""
    return math.ceil(seconds * 1000)
