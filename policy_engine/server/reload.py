"""Hot reload: recompile the policy file and swap it in, or keep the running one.

A reload is all or nothing. The file is read, validated and compiled from scratch; if any
diagnostic is an error the whole file is rejected, reported (every diagnostic, each with its
``file:line:col``) and counted, and the policy in force stays in force. A good file replaces
the old policy with one attribute assignment (:meth:`Engine.swap`), so a decision already
running finishes on the policy it started with and the next one sees the new policy.

The store keys rate-limit counters and breaker states by rule name, so a rule that keeps its
name keeps its state across the swap; nothing here copies state.

On a server, SIGHUP triggers a reload (:meth:`PolicyReloader.install_sighup`). Compiling
runs in a worker thread so a large file never stalls the event loop; the swap itself runs
on the loop. Signals that arrive while a reload is running collapse into one more reload,
which reads whatever the file holds by then.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from policy_engine.compiler.pipeline import CompileResult, compile_file
from policy_engine.core.engine import Engine
from policy_engine.errors import Diagnostic, Location, PolicyError
from policy_engine.language.model import PolicySet
from policy_engine.observe.observer import NullObserver, Observer

Compiler = Callable[[Path], CompileResult]
PolicyListener = Callable[[PolicySet], None]

_log = structlog.get_logger("policy_engine")


class PolicyReloader:
    """Reloads one policy file into one engine; counts successes and failures.

    ``loaded_at`` (seconds since the epoch) is when the policy in force was installed: at
    construction (the engine was built from the same file) and at every successful reload.
    ``on_install`` listeners run after each successful swap, on the thread that swapped.
    """

    def __init__(
        self,
        path: str | Path,
        engine: Engine,
        observer: Observer | None = None,
        *,
        compiler: Compiler | None = None,
        backend: str | None = None,
        on_install: Iterable[PolicyListener] = (),
        before_install: Iterable[PolicyListener] = (),
        wall_clock: Callable[[], float] = time.time,
        swap: PolicyListener | None = None,
    ) -> None:
        self.path = Path(path)
        self.engine = engine
        # How a new policy goes in: the engine's own swap, or one that also keeps out the
        # threads of a sync server while it does (its adapter's ``swap``).
        self._swap: PolicyListener = swap if swap is not None else engine.swap
        self.observer: Observer = observer if observer is not None else NullObserver()
        self._compile: Compiler = (
            compiler if compiler is not None else lambda p: compile_file(p, backend=backend)
        )
        self._listeners = list(on_install)
        self._preparers = list(before_install)
        self._wall_clock = wall_clock
        self.loaded_at = wall_clock()
        self.succeeded = 0
        self.failed = 0
        self.last_failure: tuple[Diagnostic, ...] = ()
        self._lock = asyncio.Lock()
        self._pending = False
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        """The policy in force and the reloads so far, as ``/status`` shows them."""
        return {
            "policy": {
                "version": self.engine.policy.version,
                "source": str(self.path),
                "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(),
            },
            "reloads": {
                "succeeded": self.succeeded,
                "failed": self.failed,
                "last_failure": [str(d) for d in self.last_failure],
            },
        }

    # -- reloading ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Compile and swap on the calling thread; True when the new policy is in force.

        For callers without an event loop (scripts, tests); a server uses
        :meth:`reload_async` so the loop keeps serving while the file compiles.
        """
        return self._finish(self._compile_safely())

    async def reload_async(self) -> bool:
        """Compile in a worker thread, then swap on the loop; reloads never overlap."""
        async with self._lock:
            outcome = await asyncio.to_thread(self._compile_safely)
            return self._finish(outcome)

    def _compile_safely(self) -> CompileResult | tuple[Diagnostic, ...]:
        try:
            return self._compile(self.path)
        except PolicyError as exc:
            return exc.diagnostics or (self._diagnostic("invalid policy"),)
        except Exception as exc:  # a compiler bug must not take the server down with it
            _log.exception("policy.compile_crashed", path=str(self.path), audit=False)
            return (self._diagnostic(f"the compiler failed: {exc!r}"),)

    def _finish(self, outcome: CompileResult | tuple[Diagnostic, ...]) -> bool:
        path = str(self.path)
        if isinstance(outcome, CompileResult):
            outcome = self._prepare(outcome)
        if not isinstance(outcome, CompileResult):
            self.failed += 1
            self.last_failure = outcome
            self.observer.reload(False, None, path, outcome)
            return False
        self._swap(outcome.policy)
        self.loaded_at = self._wall_clock()
        self.succeeded += 1
        self.last_failure = ()
        for listener in self._listeners:
            try:
                listener(outcome.policy)
            except Exception:  # the policy is in force already; report, do not undo
                _log.exception("policy.listener_failed", path=path, audit=False)
        self.observer.reload(True, outcome.policy.version, path, outcome.warnings)
        return True

    def _prepare(self, result: CompileResult) -> CompileResult | tuple[Diagnostic, ...]:
        """What must be ready before a policy is in force (its verification keys, read from
        files and the environment); a preparer that fails rejects the reload."""
        for prepare in self._preparers:
            try:
                prepare(result.policy)
            except Exception as exc:
                return (self._diagnostic(f"the policy cannot be installed: {exc}"),)
        return result

    def _diagnostic(self, message: str) -> Diagnostic:
        return Diagnostic(Location(str(self.path)), "reload-failed", message)

    # -- signals -----------------------------------------------------------------------------

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on SIGHUP; the handler runs on ``loop``, never in a signal frame."""
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def remove_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    def request_reload(self) -> None:
        """Schedule a reload on the running loop, or one more after the one in progress."""
        if self._task is not None and not self._task.done():
            self._pending = True
            return
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def wait_idle(self) -> None:
        """Wait until requested reloads have finished (shutdown and tests)."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    async def _drain(self) -> None:
        while True:
            self._pending = False
            await self.reload_async()
            if not self._pending:
                return
