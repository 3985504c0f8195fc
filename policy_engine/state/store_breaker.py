"""A circuit breaker on the shared store itself: during an outage, decide at once.

Without it, every decision that needs a dead (or hung) Redis waits ``store_timeout``
before the policy's ``on_store_error`` applies: each event of each client pays the full
timeout for as long as the outage lasts. After ``threshold`` failures in a row the breaker
opens: calls fail at once, without I/O, and a single background probe (the store's
``ping``) asks every ``probe_interval`` whether the store answers again; the first answer
closes it. So decisions during an outage cost nothing, and recovery follows within one
probe interval (plus the probe's own round trip) of the store answering.

Only failures to reach the store count, and ``threshold`` of them only make it suspect:
the probe runs at once, and the breaker opens only if the probe fails too. A burst of
calls that were merely late (this process's own loop was busy) leaves it closed, and
health is not reported down, as long as Redis answers the probe. The store's calls are
single scripts and never fail for another caller's sake, so contention opens nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

_log = logging.getLogger("policy_engine.state.store_breaker")

Probe = Callable[[], Awaitable[None]]


class StoreBreaker:
    """Open after ``threshold`` consecutive failures and a failed probe; closed again by a
    probe that answers.

    ``on_open`` is told (with the failure that opened it) when it opens, ``on_close`` when
    a probe found the store answering again.
    """

    def __init__(
        self,
        probe: Probe,
        *,
        threshold: int = 3,
        probe_interval: float = 0.25,
        probe_timeout: float = 0.5,
        on_open: Callable[[BaseException], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if threshold < 1 or probe_interval <= 0 or probe_timeout <= 0:
            raise ValueError("threshold must be >= 1, the probe's interval and timeout > 0")
        self.probe = probe
        self.threshold = threshold
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.on_open = on_open
        self.on_close = on_close
        self.is_open = False
        self.opened = 0  # how many times it opened: for metrics and tests
        self._failures = 0
        self._prober: asyncio.Task[None] | None = None

    def answered(self) -> None:
        self._failures = 0

    def failed(self, error: BaseException) -> None:
        self._failures += 1
        if self._failures >= self.threshold and self._prober is None:
            self._prober = asyncio.ensure_future(self._confirm_then_probe(error))

    async def _confirm_then_probe(self, error: BaseException) -> None:
        """Probe at once: open only if the store does not answer; then probe every
        ``probe_interval`` until it does, and close."""
        try:
            if await self._answers():
                self._failures = 0
                return
            self.is_open = True
            self.opened += 1
            _log.debug("store breaker open after %d failures", self._failures)
            if self.on_open is not None:
                self.on_open(error)
            while not await self._answers():
                await asyncio.sleep(self.probe_interval)
            self.is_open = False
            self._failures = 0
            if self.on_close is not None:
                self.on_close()
        finally:
            self._prober = None

    async def _answers(self) -> bool:
        try:
            await asyncio.wait_for(self.probe(), self.probe_timeout)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Stop probing (at shutdown)."""
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
