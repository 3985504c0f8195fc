"""A bounded outbound buffer per connection, so a slow consumer cannot grow server memory.

Engine.IO gives every client an unbounded ``asyncio.Queue``: when a client stops reading,
its TCP window fills, the transport pauses, Engine.IO's writer blocks, and every packet the
application emits to that client piles up in that queue. The :class:`Outbox` sits in front
of it. While the client keeps up, packets go straight through (nothing is allocated); once
Engine.IO's queue holds ``high_water`` packets, further packets wait in a
:class:`PriorityBuffer` of at most ``max_queue`` entries, and a pump task refills Engine.IO's
queue each time its writer has taken everything.

Delivery stays first-in first-out: priorities decide what is *dropped* when the buffer is
full (the oldest packet of the lowest priority present, or the newcomer when it ranks below
everything queued), never the order in which survivors arrive, because Socket.IO
applications rely on in-order delivery. What to do about the drops (report them, disconnect
after ``disconnect_after_drops``) is the policy's, read on every overflow so a hot reload
applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

from policy_engine.language.model import OutboundSpec, OverflowAction, Priority

T = TypeVar("T")

LEVELS = len(Priority)
CRITICAL = Priority.CRITICAL.rank
DEFAULT_HIGH_WATER = 64


class PriorityBuffer(Generic[T]):
    """FIFO delivery with priority-aware eviction, never more than ``capacity`` entries."""

    __slots__ = ("_lanes", "_seq", "capacity", "size")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._lanes: tuple[deque[tuple[int, T]], ...] = tuple(deque() for _ in range(LEVELS))
        self._seq = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[T]:
        """Entries in delivery order (a snapshot: the buffer may change while it is used)."""
        merged = sorted((entry for lane in self._lanes for entry in lane), key=_sequence)
        return iter([item for _, item in merged])

    def push(self, item: T, rank: int) -> T | None:
        """Queue ``item``; returns what had to be dropped to stay bounded (maybe ``item``)."""
        rank = min(max(rank, 0), LEVELS - 1)
        dropped: T | None = None
        while self.size >= self.capacity:
            lowest = next(r for r, lane in enumerate(self._lanes) if lane)
            if rank < lowest:
                return item
            _, dropped = self._lanes[lowest].popleft()
            self.size -= 1
        self._lanes[rank].append((self._seq, item))
        self._seq += 1
        self.size += 1
        return dropped

    def pop(self) -> T:
        """The oldest entry, whatever its priority; raises IndexError when empty."""
        best: deque[tuple[int, T]] | None = None
        for lane in self._lanes:
            if lane and (best is None or lane[0][0] < best[0][0]):
                best = lane
        if best is None:
            raise IndexError("pop from an empty PriorityBuffer")
        self.size -= 1
        return best.popleft()[1]

    def discard(self, unwanted: Callable[[T], bool]) -> int:
        """Remove every entry ``unwanted`` selects; returns how many went."""
        removed = 0
        for lane in self._lanes:
            kept = [entry for entry in lane if not unwanted(entry[1])]
            if len(kept) != len(lane):
                removed += len(lane) - len(kept)
                lane.clear()
                lane.extend(kept)
        self.size -= removed
        return removed

    def clear(self) -> None:
        for lane in self._lanes:
            lane.clear()
        self.size = 0


class Outbox(Generic[T]):
    """One client's outbound path: direct while it keeps up, buffered and bounded when not.

    ``deliver`` hands one entry to the transport (Engine.IO's ``send_packet``); ``downstream``
    is the transport's own queue, watched (never modified) to know when the client has
    caught up. ``hold()`` buffers everything until ``release()``: a reconnecting client gets
    its missed events before any live one.
    """

    __slots__ = (
        "_pump",
        "buffer",
        "deliver",
        "downstream",
        "drops",
        "held",
        "high_water",
    )

    def __init__(
        self,
        deliver: Callable[[T], Awaitable[Any]],
        downstream: asyncio.Queue[Any],
        capacity: int,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> None:
        self.deliver = deliver
        self.downstream = downstream
        self.buffer: PriorityBuffer[T] = PriorityBuffer(capacity)
        self.high_water = high_water
        self.held = False
        self.drops = 0
        self._pump: asyncio.Task[None] | None = None

    def direct(self) -> bool:
        """Whether a packet may go straight to the transport (the common, free case)."""
        return self.buffer.size == 0 and not self.held and self.downstream.qsize() < self.high_water

    def enqueue(self, item: T, rank: int, spec: OutboundSpec) -> tuple[T | None, bool]:
        """Buffer ``item``; returns (what was dropped, whether the policy says disconnect)."""
        self.buffer.capacity = max(1, spec.max_queue)
        dropped = self.buffer.push(item, rank)
        if not self.held:
            self._start_pump()
        if dropped is None:
            return None, False
        self.drops += 1
        disconnect = spec.on_overflow is OverflowAction.DISCONNECT or (
            spec.disconnect_after_drops > 0 and self.drops >= spec.disconnect_after_drops
        )
        return dropped, disconnect

    def hold(self) -> None:
        self.held = True

    def release(self, unwanted: Callable[[T], bool] | None = None) -> None:
        """Stop holding; ``unwanted`` removes held entries first (duplicates of a replay)."""
        self.held = False
        if unwanted is not None and self.buffer:
            self.buffer.discard(unwanted)
        if self.buffer:
            self._start_pump()

    def close(self) -> None:
        """Forget everything buffered and stop pumping: the connection is gone."""
        self.buffer.clear()
        self.held = False
        pump, self._pump = self._pump, None
        if pump is not None and pump is not _current_task():
            pump.cancel()

    @property
    def pumping(self) -> bool:
        return self._pump is not None

    def _start_pump(self) -> None:
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def _run_pump(self) -> None:
        buffer, downstream = self.buffer, self.downstream
        try:
            while buffer and not self.held:
                if downstream.qsize() >= self.high_water:
                    # Engine.IO's writer takes everything queued at once; when it has, the
                    # client has accepted the previous batch and the next one may follow.
                    await downstream.join()
                    continue
                while buffer and not self.held and downstream.qsize() < self.high_water:
                    await self.deliver(buffer.pop())
        finally:
            if self._pump is _current_task():
                self._pump = None


def _sequence(entry: tuple[int, Any]) -> int:
    return entry[0]


def _current_task() -> asyncio.Task[Any] | None:
    with contextlib.suppress(RuntimeError):
        return asyncio.current_task()
    return None
