"""The memory store's replay buffers: bounded in events, in bytes per stream and in total.

Stream names come from clients (a conversation id), so nothing here may grow with them:
each buffer holds at most ``limit`` events and ``max_bytes``, all of them together at most
``max_total_bytes`` (the oldest entries of the least recently active stream go first), and
a stream silent for ``retain`` is dropped. What is evicted is gone for good: a client that
missed it is told to reload (``replay_since`` answers None), never handed a replay with a
hole. A dropped stream's last id is kept a while longer (:data:`ID_RETENTION_FACTOR`), so
that its ids continue rather than restart while a client could still name one.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from typing import Any, Final, NamedTuple

from policy_engine.state.codec import encode_payload
from policy_engine.state.protocol import FOREVER, ReplayedEvent

ID_RETENTION_FACTOR: Final = 2.0
"""A dropped stream's last id is kept for this many times ``retain`` after its last event."""

ENDED_LIMIT: Final = 100_000
"""Dropped streams whose last id is kept at most (the oldest are forgotten first)."""

Entry = tuple[int, float, str, Any, int]
"""One buffered event: its id, when it was sent, the event, its data and its size."""


def replay_size(event: str, data: Any) -> int:
    """An event's size as buffered: its JSON, as the Redis store keeps it."""
    try:
        return len(json.dumps([event, encode_payload(data)], separators=(",", ":")))
    except (TypeError, ValueError):
        return len(event) + len(repr(data))


class Bounds(NamedTuple):
    """What every buffer keeps at most, as the policy's ``recovery`` says."""

    events: int
    retain: float = FOREVER
    max_bytes: int | None = None
    max_total_bytes: int | None = None


class _Stream:
    __slots__ = ("bytes", "entries", "last_id", "newest")

    def __init__(self, last_id: int, newest: float = -FOREVER) -> None:
        self.last_id = last_id
        self.newest = newest  # when its last event was sent, evicted or not
        self.entries: deque[Entry] = deque()
        self.bytes = 0


class ReplayBuffers:
    """Every stream's buffer, in order of its last event (the idle ones at the front)."""

    def __init__(self) -> None:
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        # Dropped streams: their last id and the time of their last event, oldest first.
        self._ended: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.total_bytes = 0

    def append(self, stream: str, event: str, data: Any, now: float, bounds: Bounds) -> int:
        limit, retain, max_bytes, max_total_bytes = bounds
        streams = self._streams
        buffer = streams.pop(stream, None)
        if buffer is None:
            ended = self._ended.pop(stream, None)
            buffer = _Stream(ended[0] if ended is not None else 0)
        buffer.last_id += 1
        buffer.newest = now
        size = replay_size(event, data)
        buffer.entries.append((buffer.last_id, now, event, data, size))
        buffer.bytes += size
        self.total_bytes += size
        streams[stream] = buffer  # re-inserted last: oldest activity first
        while buffer.entries and (
            len(buffer.entries) > limit or (max_bytes is not None and buffer.bytes > max_bytes)
        ):
            self._evict_oldest(buffer)
        self._drop_idle(now - retain)
        if max_total_bytes is not None:
            self._evict_beyond(max_total_bytes)
        self._forget_ended(now - ID_RETENTION_FACTOR * retain)
        return buffer.last_id

    def since(
        self, stream: str, after_id: int, max_age: float, now: float
    ) -> list[ReplayedEvent] | None:
        buffer = self._streams.get(stream)
        if buffer is None:
            ended = self._ended.get(stream)
            if ended is None:
                return [] if after_id <= 0 else None
            buffer = _Stream(ended[0])
        last_id = buffer.last_id
        if after_id > last_id:
            return None  # an id this stream never had (its ids restarted, or are not ours)
        if after_id == last_id:
            return []
        entries = buffer.entries
        oldest = entries[0][0] if entries else last_id + 1
        if after_id + 1 < oldest:
            return None  # what it missed was evicted
        missed = [entry for entry in entries if entry[0] > after_id]
        if missed and now - missed[0][1] > max_age:
            return None
        return [ReplayedEvent(event_id, event, data) for event_id, _, event, data, _ in missed]

    def _evict_oldest(self, buffer: _Stream) -> None:
        size = buffer.entries.popleft()[4]
        buffer.bytes -= size
        self.total_bytes -= size

    def _evict_beyond(self, max_total_bytes: int) -> None:
        """The oldest entries of the least recently active streams, until all fit."""
        streams = self._streams
        while self.total_bytes > max_total_bytes and streams:
            stream, buffer = next(iter(streams.items()))
            if buffer.entries:
                self._evict_oldest(buffer)
            if not buffer.entries:
                self._end(stream, buffer)

    def _drop_idle(self, before: float) -> None:
        """Drop the buffers of streams whose newest event is older than ``before``."""
        streams = self._streams
        while streams:
            stream, buffer = next(iter(streams.items()))
            if buffer.newest >= before:
                return
            self._end(stream, buffer)

    def _end(self, stream: str, buffer: _Stream) -> None:
        del self._streams[stream]
        self.total_bytes -= buffer.bytes
        self._ended[stream] = (buffer.last_id, buffer.newest)
        if len(self._ended) > ENDED_LIMIT:
            self._ended.popitem(last=False)

    def _forget_ended(self, before: float) -> None:
        ended = self._ended
        while ended:
            _, (_, newest) = next(iter(ended.items()))
            if newest >= before:
                return
            ended.popitem(last=False)

    def counts(self) -> tuple[int, int, int]:
        """Streams buffered, dropped streams remembered and bytes buffered: for tests."""
        return len(self._streams), len(self._ended), self.total_bytes
