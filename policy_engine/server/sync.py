"""Operations for a policy on the sync server (Flask-SocketIO): hot reload and the load
sampler, in threads.

``policy-engine serve`` runs an ``AsyncServer`` under uvicorn; a Flask application runs
its own server. :func:`start` gives it what ``serve`` gives an async one:

- **hot reload**: SIGHUP (or :meth:`SyncServices.reload`) recompiles the file in a
  thread of its own, never in the signal frame, and swaps the policy in through the
  adapter, under the lock every decision holds: no event is judged half on the old policy
  and half on the new. Reloads never overlap; signals during one collapse into one more.
- **the load sampler**: the async server's sampler, on the adapter's loop thread. Its
  ``loop_lag_ms`` is that thread's lag: the time a thread waits for the interpreter, which
  is what a saturated sync server shows (its request threads are the ones waiting). After
  each sample, :meth:`SyncPolicyAdapter.tick` closes idle connections and sheds.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from policy_engine.adapter.sync_server import SyncPolicyAdapter
from policy_engine.observe.observer import Observer
from policy_engine.server.reload import PolicyReloader
from policy_engine.server.sampler import LoadSampler


@dataclass
class SyncServices:
    """The reloader and sampler :func:`start` runs for one sync adapter."""

    adapter: SyncPolicyAdapter
    reloader: PolicyReloader
    sampler: LoadSampler
    _reloading: threading.Lock = field(default_factory=threading.Lock)
    _pending: bool = False

    def reload(self) -> bool:
        """Reload now, on the calling thread; True when the new policy is in force."""
        with self._reloading:
            return self.reloader.reload()

    def request_reload(self) -> None:
        """Reload in a thread of its own; a request during a reload makes one more."""
        if not self._reloading.acquire(blocking=False):
            self._pending = True
            return

        def run() -> None:
            try:
                while True:
                    self._pending = False
                    self.reloader.reload()
                    if not self._pending:
                        return
            finally:
                self._reloading.release()

        threading.Thread(target=run, name="policy-engine-reload", daemon=True).start()

    def stop(self) -> None:
        """Stop the sampler and release the adapter's connections and loop thread."""
        self.adapter.runner.on_loop(self.sampler.stop())
        self.adapter.close()


def start(
    adapter: SyncPolicyAdapter,
    policies: str | Path,
    *,
    observer: Observer | None = None,
    sighup: bool = True,
    sample_every: float = 0.5,
) -> SyncServices:
    """Start reloading ``policies`` into ``adapter`` (on SIGHUP unless ``sighup`` is
    False; installing it must happen on the main thread) and sampling the load."""
    reloader = PolicyReloader(
        policies,
        adapter.engine,
        observer if observer is not None else adapter.observer,
        before_install=[adapter.authentication.prepare],
        swap=adapter.swap,
    )
    sampler = LoadSampler(adapter.engine, adapter, sample_every)
    services = SyncServices(adapter, reloader, sampler)

    async def begin() -> None:
        sampler.start()

    adapter.runner.on_loop(begin())
    if sighup:
        signal.signal(signal.SIGHUP, lambda *_: services.request_reload())
    return services
