"""A circuit breaker on the shared store itself: during an outage, decide at once.

Without it, every decision that needs a dead (or hung) Redis waits ``store_timeout``
before the policy's ``on_store_error`` applies: each event of each client pays the full
timeout for as long as the outage lasts. After ``threshold`` failures in a row the breaker
opens: calls fail at once, without I/O, and a single background probe (the store's
``ping``) asks every ``probe_interval`` whether the store answers again; the first answer
closes it. So decisions during an outage cost nothing, and recovery follows within one
probe interval (plus the probe's own round trip) of the store answering.

Only failures to reach the store count. Nothing here opens on contention: the store's
calls are single scripts and never fail for another caller's sake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

_log = logging.getLogger("policy_engine.state.store_breaker")

Probe = Callable[[], Awaitable[None]]


class StoreBreaker:
    """Open after ``threshold`` consecutive failures; closed again by a probe that answers.

    ``on_close`` is told when a probe found the store answering again.
    """

    def __init__(
        self,
        probe: Probe,
        *,
        threshold: int = 3,
        probe_interval: float = 0.25,
        probe_timeout: float = 0.5,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if threshold < 1 or probe_interval <= 0 or probe_timeout <= 0:
            raise ValueError("threshold must be >= 1, the probe's interval and timeout > 0")
        self.probe = probe
        self.threshold = threshold
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.on_close = on_close
        self.is_open = False
        self.opened = 0  # how many times it opened: for metrics and tests
        self._failures = 0
        self._prober: asyncio.Task[None] | None = None

    def answered(self) -> None:
        self._failures = 0

    def failed(self) -> None:
        self._failures += 1
        if not self.is_open and self._failures >= self.threshold:
            self.is_open = True
            self.opened += 1
            _log.debug("store breaker open after %d failures", self._failures)
            self._prober = asyncio.ensure_future(self._probe_until_answered())

    async def _probe_until_answered(self) -> None:
        while self.is_open:
            await asyncio.sleep(self.probe_interval)
            try:
                await asyncio.wait_for(self.probe(), self.probe_timeout)
            except Exception:
                continue
            self.is_open = False
            self._failures = 0
            if self.on_close is not None:
                self.on_close()

    async def close(self) -> None:
        """Stop probing (at shutdown)."""
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
