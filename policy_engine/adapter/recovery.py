"""Connection-state recovery: replay buffers per conversation, and the replay itself.

python-socketio has no connection-state recovery (the JS Socket.IO server has). Here every
event the policy's ``recovery.events`` names, sent to a conversation (a room named after
it, or a client in it), is appended to a bounded buffer in the state store and stamped with
an ``id``. A client that reconnects within ``max_disconnection`` with the last ``id`` it
saw (``latest_event_id``) receives exactly what it missed, in order and before any live
event; when that can no longer be done it is told to reload (``RECOVERY_UNAVAILABLE``).

The buffering is the store's; what this module keeps is per process: which conversations
have, or recently had, clients here (only those are worth buffering), and the map from the
ids inside payloads to the store's numbers. On a shared store (Redis) a client may come
back to another process: every conversation is buffered there, and a process that never
saw a stream's ids takes the client's id as the store's own, which it is unless the
application numbers its events itself (then the client is told to reload, never guessed
at).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from policy_engine.core.engine import Engine
from policy_engine.core.payload import RECOVERY_UNAVAILABLE, ClientPayload
from policy_engine.observe.observer import Observer
from policy_engine.state.memory import ReplayedEvent

_log = logging.getLogger("policy_engine.adapter.recovery")


# How recovery reaches one client (the adapter's sending): an event replayed to a sid in a
# namespace from a stream, and a notice (the error event) to a sid in a namespace.
Replay = Callable[[str, Any, str, str, str], Awaitable[None]]
Notify = Callable[[str, str, Mapping[str, Any]], Awaitable[None]]


class ReplayIndex:
    """Where a reconnecting client left off, for connection-state recovery.

    The store numbers buffered events per stream; clients know the ``id`` inside each
    payload, which is the store's number unless the application set its own. This index
    maps one to the other for the last ``buffer_events`` of each stream (the part of the
    buffer that can still be replayed), and remembers which conversations have, or
    recently had, connected clients: only those are worth buffering.
    """

    def __init__(self) -> None:
        self._ids: dict[str, OrderedDict[int, int]] = {}
        self._present: dict[str, int] = {}
        self._left_at: dict[str, float] = {}
        # When each stream's ids were last recorded, oldest first: on a shared store every
        # conversation is buffered, also those with no client here to leave it.
        self._recorded_at: OrderedDict[str, float] = OrderedDict()

    def knows(self, conversation: str) -> bool:
        return conversation in self._present or conversation in self._left_at

    def join(self, conversation: str) -> None:
        self._present[conversation] = self._present.get(conversation, 0) + 1
        self._left_at.pop(conversation, None)

    def leave(self, conversation: str, now: float) -> None:
        count = self._present.get(conversation, 0) - 1
        if count > 0:
            self._present[conversation] = count
            return
        self._present.pop(conversation, None)
        self._left_at[conversation] = now

    def last_payload_id(self, stream: str) -> int | None:
        ids = self._ids.get(stream)
        return next(reversed(ids)) if ids else None

    def record(self, stream: str, payload_id: int, store_id: int, limit: int) -> None:
        ids = self._ids.setdefault(stream, OrderedDict())
        ids[payload_id] = store_id
        while len(ids) > limit:
            ids.popitem(last=False)
        recorded = self._recorded_at
        recorded.pop(stream, None)
        recorded[stream] = time.monotonic()

    def store_id(self, stream: str, payload_id: int) -> int | None:
        """The store's number for a payload id; 0 for "before the first", while buffered."""
        ids = self._ids.get(stream)
        if not ids:
            return None
        found = ids.get(payload_id)
        if found is None and payload_id == 0 and next(iter(ids.values())) == 1:
            return 0  # the client saw none of this stream, which is still complete
        return found

    def prune(self, now: float, max_age: float) -> None:
        """Forget conversations nobody has been connected to for longer than ``max_age``,
        and the ids of streams nobody here joined once nothing was sent to them for as long
        (a client of theirs coming back here then recovers as from another process)."""
        expired = [c for c, at in self._left_at.items() if now - at > max_age]
        for conversation in expired:
            del self._left_at[conversation]
            self._ids.pop(conversation, None)
        recorded = self._recorded_at
        while recorded:
            stream, at = next(iter(recorded.items()))
            if now - at <= max_age:
                return
            del recorded[stream]
            if not self.knows(stream):
                self._ids.pop(stream, None)


class Recovery:
    """Buffers what is sent to conversations and replays it to clients that come back.

    ``conversation_of`` names the conversation of a connected sid (None for anything that
    is not one), so an emit addressed to a client is buffered under its conversation.
    """

    def __init__(
        self,
        engine: Engine,
        observer: Observer,
        *,
        conversation_of: Callable[[str], str | None],
        replay: Replay,
        notify: Notify,
    ) -> None:
        self.engine = engine
        self.observer = observer
        self.index = ReplayIndex()
        self._conversation_of = conversation_of
        self._send_replayed = replay
        self._notify = notify

    async def buffer(
        self, event: str, data: dict[str, Any], target: Any
    ) -> tuple[dict[str, Any], str | None, int | None]:
        """Append an event sent to a conversation to its replay buffer; stamp its id.

        Returns the payload to send (stamped with ``id`` unless the application set its
        own), the stream it was buffered in and its id (None when it was not buffered).
        """
        streams = self._streams(target)
        if not streams:
            return data, None, None
        limit = self.engine.policy.recovery.buffer_events
        own_id = data.get("id")
        if isinstance(own_id, int) and not isinstance(own_id, bool):
            for stream in streams:
                last = self.index.last_payload_id(stream)
                if last is not None and own_id <= last:
                    continue  # already buffered: the application is replaying it itself
                store_id = await self._append(stream, event, data)
                if store_id is not None:
                    self.index.record(stream, own_id, store_id, limit)
            return data, streams[0] if len(streams) == 1 else None, own_id
        if len(streams) != 1:
            return data, None, None  # one payload cannot carry two streams' ids
        stamped = dict(data)
        store_id = await self._append(streams[0], event, stamped)
        if store_id is None:
            return data, None, None
        stamped["id"] = store_id
        self.index.record(streams[0], store_id, store_id, limit)
        return stamped, streams[0], store_id

    async def _append(self, stream: str, event: str, data: dict[str, Any]) -> int | None:
        """Buffer one event within the policy's bounds; its id, None when not buffered."""
        engine = self.engine
        recovery = engine.policy.recovery
        return await engine.state.append_replay(
            stream,
            event,
            data,
            recovery.buffer_events,
            engine.clock(),
            retain=recovery.max_disconnection,
            max_bytes=recovery.max_buffer_bytes,
            max_total_bytes=recovery.max_total_bytes,
        )

    def _streams(self, target: Any) -> list[str]:
        """The conversations an emit goes to: rooms named after one, or sids that have one.

        A broadcast to a whole namespace belongs to no conversation and is not buffered.
        On a shared store every conversation is buffered: its clients may be connected to,
        and come back to, other processes, which this one cannot know about.
        """
        shared = self.engine.state.shared
        targets = target if isinstance(target, list | tuple) else (target,)
        streams: list[str] = []
        for room in targets:
            if not isinstance(room, str):
                continue
            conversation = self._conversation_of(room)
            stream = room if conversation is None else conversation
            if stream and stream not in streams and (shared or self.index.knows(stream)):
                streams.append(stream)
        return streams

    async def recover(self, sid: str, namespace: str, conn: Mapping[str, Any], latest: int) -> int:
        """Replay, and should the replay itself fail, tell the client to reload instead.

        Returns the last event id the client now has.
        """
        try:
            return await self._replay(sid, namespace, conn, latest)
        except Exception:
            _log.exception("replaying missed events to %s failed", sid)
            with contextlib.suppress(Exception):
                await self._notify(sid, namespace, self.unavailable_payload())
            return latest

    async def _replay(self, sid: str, namespace: str, conn: Mapping[str, Any], latest: int) -> int:
        """Send a reconnecting client what it missed.

        Missed events come from the store's buffer after the one the client names; when
        they cannot all be replayed (the buffer moved past it, it is older than
        ``max_disconnection``, or this server never saw it), the client is told to reload.
        """
        engine = self.engine
        recovery = engine.policy.recovery
        stream = conn["conversation_id"]
        after = self.index.store_id(stream, latest)
        # Buffered by another process, whose ids this one never saw: the ids clients hold
        # are then the store's own, unless the application numbers the stream itself.
        elsewhere = after is None and engine.state.shared
        if elsewhere:
            after = latest
        missed: list[ReplayedEvent] | None = None
        if after is not None:
            max_age = recovery.max_disconnection
            missed = await engine.state.replay_since(stream, after, max_age, engine.clock())
        if elsewhere and missed and any(_own_id(e) not in (None, e.event_id) for e in missed):
            missed = None  # the application's own ids: nothing here maps them to the store's
        if missed is None:
            await self._notify(sid, namespace, self.unavailable_payload())
            self.observer.connection("recovery_unavailable", conn, f"after {latest}")
            return latest
        last_sent = latest
        for replayed in missed:
            data = replayed.data
            if isinstance(data, dict) and not isinstance(data.get("id"), int):
                data = {**data, "id": replayed.event_id}
            await self._send_replayed(replayed.event, data, sid, namespace, stream)
            if isinstance(data, dict) and isinstance(data.get("id"), int):
                last_sent = max(last_sent, data["id"])
        self.observer.connection("recovered", conn, f"{len(missed)} events")
        return last_sent

    @staticmethod
    def unavailable_payload() -> ClientPayload:
        return RECOVERY_UNAVAILABLE.payload("recovery")


def _own_id(event: ReplayedEvent) -> int | None:
    """The ``id`` the application put in a buffered payload itself, if any."""
    data = event.data
    own = data.get("id") if isinstance(data, dict) else None
    return own if isinstance(own, int) and not isinstance(own, bool) else None
