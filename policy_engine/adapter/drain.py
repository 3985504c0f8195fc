"""Letting every client go before the process stops: told, then closed, at a steady pace.

A server that stops with 10,000 clients connected drops them all at once, and they all
come back at once, onto the servers that are left. Here each client is first told why and
when to come back (``SERVER_DRAINING``: retryable, after a random delay up to the
policy's ``drain.jitter``, at ``drain.reconnect_url`` when the deployment has another
address), then its Engine.IO transport is closed once it has read that.

Closing the transport, not the Socket.IO namespace, is what makes clients come back: a
plain socket.io-client reconnects on its own, with its own backoff, after a transport
close, but stays away after a namespace ``disconnect`` (the server saying "go away").

Sessions are closed ``drain.close_rate`` at a time, so that their reconnects reach the
other servers spread out; when that pace would not finish before the deadline, it speeds
up to finish in time (a late drain is a dropped drain). Whatever is still open at the
deadline is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from policy_engine.core.payload import SERVER_DRAINING, ClientPayload, backoff_for
from policy_engine.language.model import DrainSpec, PolicySet


class _OnSession(Protocol):
    @property
    def eio_sid(self) -> str: ...


S = TypeVar("S", bound=_OnSession)

_log = logging.getLogger("policy_engine.adapter.attach")  # the adapter's one logger

TICK = 0.05
"""Seconds between two batches of closes, at least (a batch is what the pace allows in it)."""

CLOSING_MARGIN = 2.5
"""Seconds kept before the deadline for the last transports to close (their clients
reading the notice first: see ``CLOSE_DRAIN``), so the process exits in time."""


@dataclass
class DrainReport:
    """What a drain did: sessions told and closed on pace, and closed at the deadline."""

    sessions: int = 0
    paced: int = 0
    at_deadline: int = 0


def drain_notice(policy: PolicySet, spec: DrainSpec, rng: random.Random) -> dict[str, Any]:
    """The notice for one client: its own random delay, so a batch does not come back as one."""
    payload: ClientPayload = SERVER_DRAINING.payload(
        "drain", retry_after=rng.uniform(0.0, spec.jitter), backoff=backoff_for(policy)
    )
    notice: dict[str, Any] = dict(payload)
    if spec.reconnect_url:
        notice["reconnect_url"] = spec.reconnect_url
    return notice


async def drain_sessions(  # noqa: PLR0917 (the sessions, the pace, and the two actions)
    sessions: Iterable[str],
    spec: DrainSpec,
    deadline: float,
    tell: Callable[[str], Awaitable[None]],
    close: Callable[[str], Awaitable[None]],
    clock: Callable[[], float],
) -> DrainReport:
    """Tell and close each Engine.IO session, ``spec.close_rate`` at most, all by ``deadline``
    (on ``clock``); ``close`` waits for the client to have read what it was told."""
    waiting = list(sessions)
    report = DrainReport(sessions=len(waiting))
    closing: set[asyncio.Task[None]] = set()

    async def let_go(eio_sid: str, notify: bool) -> None:
        try:
            if notify:
                await tell(eio_sid)
        except Exception:  # the client went meanwhile: it is closed all the same
            _log.debug("telling %s failed", eio_sid, exc_info=True)
        try:
            await close(eio_sid)
        except Exception:
            _log.exception("closing %s failed", eio_sid)

    def start(eio_sid: str, notify: bool) -> None:
        task = asyncio.ensure_future(let_go(eio_sid, notify))
        closing.add(task)
        task.add_done_callback(closing.discard)

    rate = spec.close_rate.per_second
    while waiting:
        left = deadline - CLOSING_MARGIN - clock()
        if left <= 0:
            break
        # On pace, unless the pace would miss the deadline: then fast enough to make it.
        pace = max(rate, len(waiting) / left)
        batch = min(len(waiting), max(1, math.ceil(pace * TICK)))
        for eio_sid in waiting[:batch]:
            start(eio_sid, notify=True)
        del waiting[:batch]
        report.paced += batch
        if waiting:
            await asyncio.sleep(batch / pace)
    for eio_sid in waiting:  # the deadline came: no time to be read, closed at once
        start(eio_sid, notify=False)
    report.at_deadline = len(waiting)
    if closing:
        await asyncio.wait(closing, timeout=max(0.0, deadline - clock()))
    return report


def by_session(states: Iterable[S]) -> dict[str, list[S]]:
    """These connections by Engine.IO session, sessions oldest first: read once per drain,
    not once per session (10,000 sessions would make that 10^8 looks)."""
    sessions: dict[str, list[S]] = {}
    for state in states:
        sessions.setdefault(state.eio_sid, []).append(state)
    return sessions
