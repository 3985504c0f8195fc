"""The engine's coroutines called from threads: how the sync server reaches the one engine.

The engine is written once, with ``async`` methods, because a shared store (Redis) must
wait for its answers. On ``socketio.Server`` the hooks run in plain threads (or green
threads, when eventlet or gevent patch ``threading``), with no event loop. Two ways to
reach the engine from there were measured (``benchmarks/RESULTS.md``, Flask-SocketIO):

- **inline**: on the memory store no coroutine of the engine ever suspends (the store
  answers in the same call), so sending ``None`` into it once runs it to its
  ``StopIteration``. A decision then costs what it costs on the async server, plus one
  lock. The lock is needed: the memory store's read-modify-write of a rate-limit state is
  not atomic across threads, and neither is :meth:`Engine.swap` (a reload), so every
  engine call and every swap runs under it.
- **a loop thread**: one daemon thread runs one asyncio loop; a hook hands it the
  coroutine (``run_coroutine_threadsafe``) and waits for the result. Each call pays two
  thread switches (tens of microseconds, more on a busy machine), but it is the only way
  for a store whose client belongs to one loop (Redis), and for what really waits (a
  JWKS download, an application's ``async`` claims loader).

So the memory store runs inline and a shared store on the loop thread, chosen once per
engine; authentication, which may download keys, always runs on the loop thread (once
per connect, not per event). One engine, one copy of the rules: only the way its
coroutines are driven differs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from policy_engine.core.engine import Engine

T = TypeVar("T")

# A hook waits at most this long for the loop thread: the store's own timeout is far
# shorter, so only a wedged loop reaches it.
LOOP_TIMEOUT = 30.0


class SuspendedError(RuntimeError):
    """An engine coroutine driven inline waited for something: a bug of the memory store."""


def run_inline(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its result, in the calling thread."""
    try:
        while True:
            if coroutine.send(None) is not None:
                break  # a future: only a running loop can wait for it
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise SuspendedError("an engine coroutine waited while driven inline")


class EngineRunner:
    """Drives one engine's calls from any thread: inline under a lock, or on a loop thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.inline = not engine.state.shared
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """An engine coroutine's result, whichever thread asks."""
        if not self.inline:
            return self.on_loop(coroutine)
        with self.lock:
            return run_inline(coroutine)

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """A plain engine method's result (``judge_event_now``, ``swap``), serialised with
        every other engine call."""
        if not self.inline:
            return self.on_loop(_called(function, *args))
        with self.lock:
            return function(*args)

    def call_on_loop(self, function: Callable[..., T], *args: Any) -> T:
        """A plain function's result, called on the loop thread (for state that the loop's
        coroutines also change, such as the admission queue's lines)."""
        return self.on_loop(_called(function, *args))

    def on_loop(self, coroutine: Coroutine[Any, Any, T], timeout: float = LOOP_TIMEOUT) -> T:
        """Run ``coroutine`` on the loop thread (started on first use) and wait for it."""
        if self._thread is not None and threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("the loop thread cannot wait for itself: call from another thread")
        loop = self._loop or self._start()
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    def close(self) -> None:
        """Stop the loop thread, if it was started."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LOOP_TIMEOUT)
        loop.close()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._starting:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=serve, name="policy-engine-loop", daemon=True)
            thread.start()
            ready.wait(LOOP_TIMEOUT)
            self._thread = thread
            self._loop = loop
            return loop


async def _called(function: Callable[..., T], *args: Any) -> T:
    return function(*args)
