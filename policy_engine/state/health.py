"""Whether the shared state store answers, as the calls made to it find out.

During a Redis outage every decision that needs the store follows the policy's
``on_store_error``: that is by design, and the server keeps serving, but operators must
see it happen. Reporting each failed call would flood the logs with one line per event,
so listeners hear only the changes (the store stopped answering, it answers again), and
``failures`` counts every failed call for metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

_log = logging.getLogger("policy_engine.state.health")

Listener = Callable[[bool, str], None]
"""Told ``(available, detail)`` at each change; ``detail`` is the error that began it."""


class StoreHealth:
    def __init__(self) -> None:
        self.available = True
        self.failures = 0
        self.listeners: list[Listener] = []

    def failed(self, error: BaseException) -> None:
        self.failures += 1
        self.down(error)

    def down(self, error: BaseException) -> None:
        """The store is known to be down (a failed call alone may only be late)."""
        if self.available:
            self.available = False
            self._tell(False, repr(error))

    def answered(self) -> None:
        if not self.available:
            self.available = True
            self._tell(True, "")

    def _tell(self, available: bool, detail: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(available, detail)
            except Exception:
                _log.exception("a store health listener failed")
