"""The load sampler: measures the process on a timer and publishes the ``load`` context.

Shedding rules read ``load.loop_lag_ms``, ``load.overloaded`` and friends on every
decision, so those values must cost nothing to read: this module measures them in its own
background task and the request path only looks up a dict. Each sample builds a **new**
dict and assigns it to ``engine.load`` (one attribute assignment): a decision that already
took the old dict keeps reading one consistent sample, and nothing mutates a dict that a
CEL evaluation may be walking.

Event-loop lag is measured the way a blocked loop shows itself: a short sleep that wakes up
late. The sampler probes every ``probe_interval`` and reports the worst lag seen since the
previous sample, so a stall shorter than the sampling interval is not missed.
``overloaded_ms`` is how long that raw lag has stayed above ``lag_threshold_ms``.

Raw samples are what a server rides out anyway (a GC pause, one burst of handshakes), so
the policy's ``load`` section also gets smoothed signals (``loop_lag_avg_ms``,
``events_per_second_avg``, ``connects_per_second_avg``: moving averages over its
``window``) and ``overloaded``, true between the enter and exit thresholds of its
``overloaded`` block and for at least its ``min_hold``: the signals shedding rules should
act on. The section is read from the engine's policy at every sample, so a reload applies
from the next one and keeps the averages.

After each sample the sampler calls ``shed_tick()`` on the adapter, which disconnects what
the policy's ``action: disconnect`` rules pick.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import structlog

from policy_engine.algorithms.smoothing import MovingAverage, Overload
from policy_engine.core.decision import Decision
from policy_engine.core.engine import Engine
from policy_engine.language.model import LoadSpec
from policy_engine.observe.observer import NullObserver

Clock = Callable[[], float]
SampleListener = Callable[[Mapping[str, int]], None]

_log = structlog.get_logger("policy_engine")
_MB = 1024 * 1024


@runtime_checkable
class ConnectionSource(Protocol):
    """What the sampler needs from the Socket.IO adapter.

    An adapter that also has ``events_received()`` (events received since the start) is
    the counter behind ``load.events_per_second`` unless the sampler is given another.
    """

    def active_connections(self) -> int: ...

    async def shed_tick(self) -> int: ...


class EventCounter(NullObserver):
    """Counts incoming events and connects, O(1) each, for ``load.events_per_second`` and
    ``load.connects_per_second``.

    As an observer it counts every event and every connect the engine judges (a refused
    connect too: the rate is what arrives, not what is let in); ``count_event()`` is for
    callers that count events themselves. The adapter counts its own events, not its
    connects, so a server gives the sampler one of these for connects.
    """

    def __init__(self) -> None:
        self.total = 0
        self.connects = 0

    def count_event(self) -> None:
        self.total += 1

    def decision(
        self,
        hook: str,
        decision: Decision,  # noqa: ARG002
        seconds: float,  # noqa: ARG002
        conn: Mapping[str, Any] | None,  # noqa: ARG002
    ) -> None:
        if hook == "event":
            self.total += 1
        elif hook == "connect":
            self.connects += 1


class ProcessProbe:
    """Resident memory (MB) and CPU use (percent of one core) of this process.

    Uses psutil when it is installed; otherwise ``/proc/self/statm`` (or the peak RSS from
    ``resource`` where there is no ``/proc``) and ``os.times()``.
    """

    def __init__(self, *, use_psutil: bool | None = None, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._process: Any = None
        if use_psutil is not False:
            try:
                import psutil  # noqa: PLC0415 - optional dependency
            except ImportError:
                if use_psutil:
                    raise
            else:
                self._process = psutil.Process()
                self._process.cpu_percent(None)  # the first call only sets the baseline
        self._last_cpu = _cpu_seconds()
        self._last_at = clock()

    @property
    def uses_psutil(self) -> bool:
        return self._process is not None

    def sample(self) -> tuple[int, int]:
        if self._process is not None:
            memory = self._process.memory_info().rss
            cpu = self._process.cpu_percent(None)
            return int(memory // _MB), round(cpu)
        now = self._clock()
        used = _cpu_seconds()
        elapsed = now - self._last_at
        cpu = 100 * (used - self._last_cpu) / elapsed if elapsed > 0 else 0.0
        self._last_cpu, self._last_at = used, now
        return int(_rss_bytes() // _MB), round(cpu)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _rss_bytes() -> int:
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/self/statm", encoding="ascii") as statm,
    ):
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import resource  # noqa: PLC0415 - not on Windows
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class LoadSampler:
    """Samples load every ``interval`` seconds into ``engine.load``, then sheds.

    ``connections`` is the adapter (its ``active_connections()`` and ``events_received()``
    are read and its ``shed_tick()`` called after every sample) or a plain callable
    returning the count (no shedding). ``events``, when given, is the counter behind
    ``events_per_second`` instead of the adapter's; ``connects`` is the counter behind
    ``connects_per_second`` (``events`` when not given; without either, it stays 0).
    """

    def __init__(
        self,
        engine: Engine,
        connections: ConnectionSource | Callable[[], int],
        interval: float = 0.5,
        *,
        events: EventCounter | None = None,
        connects: EventCounter | None = None,
        lag_threshold_ms: int = 100,
        probe_interval: float = 0.05,
        process: ProcessProbe | None = None,
        on_sample: Iterable[SampleListener] = (),
        clock: Clock = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.engine = engine
        counter = events if events is not None else EventCounter()
        self._events: Callable[[], int] = lambda: counter.total
        connect_counter = connects if connects is not None else counter
        self._connects: Callable[[], int] = lambda: connect_counter.connects
        if isinstance(connections, ConnectionSource):
            self._count: Callable[[], int] = connections.active_connections
            self._shed: Callable[[], Any] | None = connections.shed_tick
            received = getattr(connections, "events_received", None)
            if events is None and received is not None:
                self._events = received
        else:
            self._count, self._shed = connections, None
        self.interval = interval
        self.probe_interval = min(probe_interval, interval)
        self.lag_threshold_ms = lag_threshold_ms
        self.process = process if process is not None else ProcessProbe()
        self._listeners = list(on_sample)
        self._clock = clock
        self.samples = 0
        self._last_events = self._events()
        self._last_connects = self._connects()
        self._last_at = clock()
        self._overloaded_since: float | None = None
        self._spec: LoadSpec = engine.policy.load
        self._lag_avg = MovingAverage(self._spec.window)
        self._events_avg = MovingAverage(self._spec.window)
        self._connects_avg = MovingAverage(self._spec.window)
        self._overload = Overload(self._spec.overloaded)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start sampling on the running loop; starting twice is a no-op."""
        if self.running:
            return
        self._last_events = self._events()
        self._last_connects = self._connects()
        self._last_at = self._clock()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="load-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def sample(self, lag: float, now: float) -> dict[str, int]:
        """Take one sample, given the worst loop lag (seconds) seen since the last one.

        Builds a new ``load`` dict, installs it on the engine and tells the listeners.
        """
        lag_ms = max(0, round(lag * 1000))
        if lag_ms > self.lag_threshold_ms:
            if self._overloaded_since is None:
                # The lag was already there for about one probe when it was seen.
                self._overloaded_since = now - lag
            overloaded_ms = round((now - self._overloaded_since) * 1000)
        else:
            self._overloaded_since = None
            overloaded_ms = 0
        events, connects = self._events(), self._connects()
        elapsed = now - self._last_at
        rate = round((events - self._last_events) / elapsed) if elapsed > 0 else 0
        connect_rate = round((connects - self._last_connects) / elapsed) if elapsed > 0 else 0
        self._last_events, self._last_connects, self._last_at = events, connects, now
        self._follow_policy()
        smoothed = {
            "loop_lag_avg_ms": round(self._lag_avg.update(lag_ms, elapsed)),
            "events_per_second_avg": round(self._events_avg.update(rate, elapsed)),
            "connects_per_second_avg": round(self._connects_avg.update(connect_rate, elapsed)),
        }
        memory_mb, cpu_percent = self.process.sample()
        load = {
            "active_connections": int(self._count()),
            "loop_lag_ms": lag_ms,
            "events_per_second": rate,
            "memory_mb": memory_mb,
            "cpu_percent": cpu_percent,
            "overloaded_ms": overloaded_ms,
            "connects_per_second": connect_rate,
            **smoothed,
            "overloaded": self._overload.update(smoothed, now),
        }
        self.engine.load = load
        self.samples += 1
        for listener in self._listeners:
            listener(load)
        return load

    def _follow_policy(self) -> None:
        """Apply a reloaded policy's ``load`` section; the averages and the state carry on."""
        spec = self.engine.policy.load
        if spec is self._spec:
            return
        self._spec = spec
        for average in (self._lag_avg, self._events_avg, self._connects_avg):
            average.window = spec.window
        self._overload.spec = spec.overloaded

    async def _run(self) -> None:
        clock = self._clock
        worst = 0.0
        next_sample = clock() + self.interval
        while True:
            expected = clock() + self.probe_interval
            await asyncio.sleep(self.probe_interval)
            now = clock()
            worst = max(worst, now - expected)
            if now < next_sample:
                continue
            try:
                self.sample(worst, now)
            except Exception:
                _log.exception("load.sample_failed", audit=False)
            worst = 0.0
            next_sample = now + self.interval
            if self._shed is not None:
                try:
                    await self._shed()
                except Exception:
                    _log.exception("load.shed_failed", audit=False)
