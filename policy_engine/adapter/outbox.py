"""A bounded outbound buffer per connection, so a slow consumer cannot grow server memory.

Engine.IO gives every client an unbounded ``asyncio.Queue``: when a client stops reading,
its TCP window fills, the transport pauses, Engine.IO's writer blocks, and every packet the
application emits to that client piles up in that queue. The :class:`Outbox` sits in front
of it. While the client keeps up, packets go straight through (nothing is allocated); once
Engine.IO's queue holds ``high_water`` packets, or ``max_bytes`` handed to it since it was
last seen empty, further packets wait in a :class:`PriorityBuffer` of at most ``max_queue``
entries and ``max_bytes`` bytes, and a pump task refills Engine.IO's queue each time its
writer has taken everything. Replayed events, which must go ahead of what is buffered, wait
for room in Engine.IO's queue instead (:meth:`Outbox.room`).

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
DEFAULT_MAX_BYTES = OutboundSpec().max_bytes


class PriorityBuffer(Generic[T]):
    """FIFO delivery with priority-aware eviction, never more than ``capacity`` entries nor
    ``max_bytes`` bytes (one entry larger than that on its own is still taken)."""

    __slots__ = ("_lanes", "_seq", "bytes", "capacity", "max_bytes", "size")

    def __init__(self, capacity: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes
        self._lanes: tuple[deque[tuple[int, T, int]], ...] = tuple(deque() for _ in range(LEVELS))
        self._seq = 0
        self.size = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[T]:
        """Entries in delivery order (a snapshot: the buffer may change while it is used)."""
        merged = sorted((entry for lane in self._lanes for entry in lane), key=_sequence)
        return iter([entry[1] for entry in merged])

    def push(self, item: T, rank: int, size: int = 0) -> T | None:
        """Queue ``item`` of ``size`` bytes; returns what had to be dropped to stay bounded
        (maybe ``item``; when several went, the last of them)."""
        rank = min(max(rank, 0), LEVELS - 1)
        dropped: T | None = None
        while self.size >= self.capacity or (self.size and self.bytes + size > self.max_bytes):
            lowest = next(r for r, lane in enumerate(self._lanes) if lane)
            if rank < lowest:
                return item
            _, dropped, gone = self._lanes[lowest].popleft()
            self.size -= 1
            self.bytes -= gone
        self._lanes[rank].append((self._seq, item, size))
        self._seq += 1
        self.size += 1
        self.bytes += size
        return dropped

    def pop(self) -> T:
        """The oldest entry, whatever its priority; raises IndexError when empty."""
        best: deque[tuple[int, T, int]] | None = None
        for lane in self._lanes:
            if lane and (best is None or lane[0][0] < best[0][0]):
                best = lane
        if best is None:
            raise IndexError("pop from an empty PriorityBuffer")
        _, item, size = best.popleft()
        self.size -= 1
        self.bytes -= size
        return item

    def peek_size(self) -> int:
        """The size of the entry :meth:`pop` would return (0 when empty)."""
        best: tuple[int, T, int] | None = None
        for lane in self._lanes:
            if lane and (best is None or lane[0][0] < best[0]):
                best = lane[0]
        return best[2] if best is not None else 0

    def discard(self, unwanted: Callable[[T], bool]) -> int:
        """Remove every entry ``unwanted`` selects; returns how many went."""
        removed = 0
        for lane in self._lanes:
            kept = [entry for entry in lane if not unwanted(entry[1])]
            if len(kept) != len(lane):
                removed += len(lane) - len(kept)
                self.bytes -= sum(entry[2] for entry in lane) - sum(entry[2] for entry in kept)
                lane.clear()
                lane.extend(kept)
        self.size -= removed
        return removed

    def clear(self) -> None:
        for lane in self._lanes:
            lane.clear()
        self.size = 0
        self.bytes = 0


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
        "sent_bytes",
    )

    def __init__(
        self,
        deliver: Callable[[T], Awaitable[Any]],
        downstream: asyncio.Queue[Any],
        capacity: int,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.deliver = deliver
        self.downstream = downstream
        self.buffer: PriorityBuffer[T] = PriorityBuffer(capacity, max_bytes)
        self.high_water = high_water
        self.held = False
        self.drops = 0
        # Bytes handed to the transport since its queue was last seen empty.
        self.sent_bytes = 0
        self._pump: asyncio.Task[None] | None = None

    def direct(self, size: int = 0) -> bool:
        """Whether a packet of ``size`` bytes may go straight to the transport (the common,
        free case); if so, it is counted as handed over."""
        if self.buffer.size or self.held:
            return False
        # _fits, inline: this runs for every packet sent.
        queued = self.downstream.qsize()
        if not queued:
            self.sent_bytes = size
            return True
        if queued >= self.high_water or self.sent_bytes + size > self.buffer.max_bytes:
            return False
        self.sent_bytes += size
        return True

    def _fits(self, size: int) -> bool:
        queued = self.downstream.qsize()
        if not queued:
            self.sent_bytes = 0
        elif queued >= self.high_water or self.sent_bytes + size > self.buffer.max_bytes:
            return False
        self.sent_bytes += size
        return True

    async def room(self, size: int, patience: float) -> bool:
        """Wait until the transport can take ``size`` more bytes, at most ``patience``
        seconds; whether it can (then they are counted as handed over)."""
        try:
            async with asyncio.timeout(patience):
                while not self._fits(size):
                    await self.downstream.join()
        except TimeoutError:
            return False
        return True

    def enqueue(
        self, item: T, rank: int, spec: OutboundSpec, size: int = 0
    ) -> tuple[T | None, bool]:
        """Buffer ``item``; returns (what was dropped, whether the policy says disconnect)."""
        self.buffer.capacity = max(1, spec.max_queue)
        self.buffer.max_bytes = spec.max_bytes
        entries = len(self.buffer) + 1
        dropped = self.buffer.push(item, rank, size)
        if not self.held:
            self._start_pump()
        if dropped is None:
            return None, False
        self.drops += entries - len(self.buffer)  # more than one when a large one came in
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
                if not self._fits(buffer.peek_size()):
                    # Engine.IO's writer takes everything queued at once; when it has, the
                    # client has accepted the previous batch and the next one may follow.
                    await downstream.join()
                    continue
                await self.deliver(buffer.pop())
        finally:
            if self._pump is _current_task():
                self._pump = None


def _sequence(entry: tuple[int, Any, int]) -> int:
    return entry[0]


def _current_task() -> asyncio.Task[Any] | None:
    with contextlib.suppress(RuntimeError):
        return asyncio.current_task()
    return None
