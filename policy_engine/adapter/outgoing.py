"""The adapter's outgoing half: every packet to a client, and what the policy does with it.

python-socketio sends each packet through Engine.IO's ``send_packet``, which the adapter
replaces with :meth:`Outgoing.send_packet`, and each event through ``emit``, replaced with
:meth:`Outgoing.emit`. Between the two, a context variable carries what the ``emit`` in
progress sends (:class:`Emission`): its priority, its replay id and whether it is a replay,
so that each packet it becomes is judged by the emit hook's rules and, when its client is
behind, buffered at that priority. Each Engine.IO transport has a :class:`Link`: its bounded
outbound buffer and the namespaces connected over it. A client that keeps up costs nothing
here but a lookup; one that falls behind gets its packets buffered, the lowest priority
dropped first, and is disconnected when the policy says so. The bounds are in packets and
in bytes, and hold for replays and for events relayed from other processes as well.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from policy_engine.adapter.connection import ConnectionState
from policy_engine.adapter.outbox import CRITICAL, Outbox
from policy_engine.core.decision import Outcome
from policy_engine.core.engine import Engine
from policy_engine.language.contexts import Hook
from policy_engine.language.model import Priority
from policy_engine.observe.observer import Observer

_log = logging.getLogger("policy_engine.adapter.outgoing")

_NORMAL = Priority.NORMAL.rank
_EVENT_TYPES = frozenset("25")  # Socket.IO EVENT and BINARY_EVENT packet types
_JSON = json.JSONDecoder()
# How long a replay waits for a client that does not read before it is disconnected.
REPLAY_PATIENCE = 10.0

Buffered = tuple[dict[str, Any], str | None, int | None]
"""What recovery's buffer makes of an emit: the data to send, its stream and its id."""
Buffer = Callable[[str, dict[str, Any], Any], Awaitable[Buffered]]
"""Recovery's buffer: ``(event, data, target)`` to :data:`Buffered`."""


@dataclass(frozen=True, slots=True)
class Emission:
    """What the ``emit`` in progress sends, for the packets it produces downstream."""

    event: str
    rank: int
    namespace: str
    data: Any = None
    stream: str | None = None
    event_id: int | None = None
    replay: bool = False


_EMISSION: ContextVar[Emission | None] = ContextVar("policy_engine_emission", default=None)


@dataclass(frozen=True, slots=True)
class Queued:
    """A packet held in a link's outbound buffer, with the emission it came from."""

    packet: Any
    emission: Emission | None


class _Done:
    """An awaitable that is already done: a packet buffered rather than sent now."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]


_SENT = _Done()


class Link:
    """One Engine.IO transport: its outbound buffer and the namespaces connected over it."""

    __slots__ = ("closing", "eio_sid", "outbox", "states")

    def __init__(self, eio_sid: str, outbox: Outbox[Queued]) -> None:
        self.eio_sid = eio_sid
        self.outbox = outbox
        self.states: dict[str, ConnectionState] = {}
        self.closing = False


class Outgoing:
    """The replacements for ``emit`` and Engine.IO's ``send_packet`` on one server.

    ``buffer`` is connection-state recovery's (it stamps and buffers the events a
    conversation may have to replay); ``spawn`` runs a background task the adapter keeps
    track of (the disconnect of a client that does not keep up).
    """

    def __init__(
        self,
        sio: Any,
        engine: Engine,
        observer: Observer,
        *,
        buffer: Buffer,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self.sio = sio
        self.engine = engine
        self.observer = observer
        self.links: dict[str, Link] = {}
        self._buffer_for_replay = buffer
        self._spawn = spawn
        # The originals, called directly on the hot path.
        self._emit: Callable[..., Awaitable[Any]] = sio.emit
        self._eio_send_packet: Callable[[str, Any], Awaitable[Any]] = sio.eio.send_packet

    def install(self) -> None:
        self.sio.emit = self.emit
        self.sio.eio.send_packet = self.send_packet

    # -- links -----------------------------------------------------------------------------

    def track(self, state: ConnectionState) -> Link | None:
        """The link of a newly connected namespace (None for a transport it cannot watch)."""
        link = self.links.get(state.eio_sid)
        if link is None:
            link = self._new_link(state.eio_sid)
        if link is not None:
            link.states[state.namespace] = state
        return link

    def untrack(self, state: ConnectionState) -> None:
        link = self.links.get(state.eio_sid)
        if link is not None and link.states.get(state.namespace) is state:
            del link.states[state.namespace]
            if not link.states:
                del self.links[state.eio_sid]
                link.outbox.close()

    def close(self) -> None:
        for link in self.links.values():
            link.outbox.close()

    def _new_link(self, eio_sid: str) -> Link | None:
        socket = self.sio.eio.sockets.get(eio_sid)
        queue = getattr(socket, "queue", None)
        if not isinstance(queue, asyncio.Queue):
            return None
        send = self._eio_send_packet

        async def deliver(item: Queued) -> None:
            await send(eio_sid, item.packet)

        outbound = self.engine.policy.connections.outbound
        outbox = Outbox(deliver, queue, outbound.max_queue, max_bytes=outbound.max_bytes)
        link = self.links[eio_sid] = Link(eio_sid, outbox)
        return link

    # -- emits -----------------------------------------------------------------------------

    async def emit(  # noqa: PLR0917 (AsyncServer.emit's signature)
        self,
        event: str,
        data: Any = None,
        to: Any = None,
        room: Any = None,
        skip_sid: Any = None,
        namespace: str | None = None,
        callback: Any = None,
        ignore_queue: bool = False,
    ) -> Any:
        """``AsyncServer.emit``: recovery's buffer first, then every packet at its priority."""
        policy = self.engine.policy
        spec = policy.events.get(event) or policy.default_event
        recovery = policy.recovery
        stream: str | None = None
        event_id: int | None = None
        if recovery.enabled and event in recovery.events and isinstance(data, dict):
            data, stream, event_id = await self._buffer_for_replay(event, data, to or room)
        token = _EMISSION.set(
            Emission(event, spec.priority.rank, namespace or "/", data, stream, event_id)
        )
        try:
            return await self._emit(
                event,
                data,
                to=to,
                room=room,
                skip_sid=skip_sid,
                namespace=namespace,
                callback=callback,
                ignore_queue=ignore_queue,
            )
        finally:
            _EMISSION.reset(token)

    async def notify(self, event: str, sid: str, namespace: str, data: Any) -> None:
        """Send one client an event at critical priority (dropped last, if ever).

        The client is connected to this process: a message-queue client manager need not
        publish it to the others (``ignore_queue``), nor the replays below.
        """
        token = _EMISSION.set(Emission(event, CRITICAL, namespace))
        try:
            await self._emit(event, data, to=sid, namespace=namespace, ignore_queue=True)
        finally:
            _EMISSION.reset(token)

    async def replay(self, event: str, data: Any, sid: str, namespace: str, stream: str) -> None:
        """A missed event, sent ahead of the live events held back while it replays."""
        token = _EMISSION.set(Emission(event, CRITICAL, namespace, data, stream, None, True))
        try:
            await self._emit(event, data, to=sid, namespace=namespace, ignore_queue=True)
        finally:
            _EMISSION.reset(token)

    # -- packets ---------------------------------------------------------------------------

    def send_packet(self, eio_sid: str, pkt: Any) -> Awaitable[Any]:
        """Engine.IO's ``send_packet``: straight through unless the client is behind.

        Its callers await what it returns; while the client keeps up that is Engine.IO's
        own coroutine, so the common case (an ack, an event to a reader that keeps up)
        costs no coroutine frame of its own.
        """
        link = self.links.get(eio_sid)
        if link is None:
            return self._eio_send_packet(eio_sid, pkt)
        emission = _EMISSION.get()
        if emission is not None:
            if emission.replay:
                return self._send_replayed(link, pkt)
            return self._send_emitted(link, emission, pkt)
        data = pkt.data
        size = len(data) if isinstance(data, str | bytes) else 0  # _size, inline
        if link.closing or link.outbox.direct(size):
            # A control packet (the disconnect) of a closing connection must not wait
            # behind what will never be sent.
            return self._eio_send_packet(eio_sid, pkt)
        self._hold(link, pkt, None, self._rank(pkt.data), size)
        return _SENT

    def _rank(self, data: Any) -> int:
        """The priority of a packet sent outside ``emit``, read only when it is buffered.

        Such a packet is an event another process emitted, relayed by a message-queue
        client manager, or a control packet (critical). An event's name is the first item
        of the encoded JSON array, decoded alone; its spec gives the priority.
        """
        if not (isinstance(data, str) and data[:1] in _EVENT_TYPES):
            return CRITICAL
        try:
            name, _ = _JSON.raw_decode(data, data.index("[") + 1)
        except ValueError:
            return _NORMAL
        policy = self.engine.policy
        spec = policy.events.get(name) if isinstance(name, str) else None
        return (spec or policy.default_event).priority.rank

    async def _send_emitted(self, link: Link, emission: Emission, pkt: Any) -> None:
        """A packet of an ``emit``: the emit hook's rules first, then as any other packet."""
        if link.closing:
            return  # the client is being disconnected for not keeping up
        if self.engine.policy.by_hook.limits_or_sheds(Hook.EMIT) and not await self._judge(
            link, emission, pkt
        ):
            return
        size = _size(pkt)
        if link.outbox.direct(size):
            await self._eio_send_packet(link.eio_sid, pkt)
        else:
            self._hold(link, pkt, emission, emission.rank, size)

    async def _send_replayed(self, link: Link, pkt: Any) -> None:
        """A replayed packet goes ahead of held live events, but only as fast as the client
        reads: one that does not read for ``REPLAY_PATIENCE`` is a slow consumer."""
        if link.closing:
            return
        if await link.outbox.room(_size(pkt), REPLAY_PATIENCE):
            await self._eio_send_packet(link.eio_sid, pkt)
        elif not link.closing:
            link.closing = True
            self._spawn(self._close_link(link, "slow_consumer"))

    def _hold(self, link: Link, pkt: Any, emission: Emission | None, rank: int, size: int) -> None:
        """Buffer a packet for a client that is behind; the policy decides what overflows."""
        dropped, disconnect = link.outbox.enqueue(
            Queued(pkt, emission), rank, self.engine.policy.connections.outbound, size
        )
        if dropped is not None:
            self._report_drop(link, dropped, "overflow")
        if disconnect and not link.closing:
            link.closing = True
            self._spawn(self._close_link(link, "slow_consumer"))

    async def _judge(self, link: Link, emission: Emission, pkt: Any) -> bool:
        """The emit hook's rules for one recipient: whether the packet may go."""
        state = link.states.get(emission.namespace)
        if state is None:
            return True
        data = pkt.data
        event = {
            "name": emission.event,
            "size_bytes": len(data) if isinstance(data, str | bytes) else 0,
            "priority": "",
            "has_ack": False,
            "payload": emission.data,
        }
        started = time.perf_counter()
        decision = await self.engine.on_emit(state.conn, state.claims, event)
        self.observer.decision("emit", decision, time.perf_counter() - started, state.conn)
        if decision.outcome is Outcome.DELAY:
            await asyncio.sleep(decision.delay)
            return True
        if decision.allowed:
            return True
        self.observer.outbound_drop(state.conn, emission.event, decision.rule or "emit")
        return False

    def _report_drop(self, link: Link, dropped: Queued, reason: str) -> None:
        emission = dropped.emission
        namespace = emission.namespace if emission is not None else "/"
        state = link.states.get(namespace) or next(iter(link.states.values()), None)
        if state is not None:
            event = emission.event if emission is not None else ""
            self.observer.outbound_drop(state.conn, event, reason)

    async def _close_link(self, link: Link, reason: str) -> None:
        """Disconnect every namespace of a transport whose client does not keep up."""
        _EMISSION.set(None)  # this task inherited the emit that overflowed
        link.outbox.close()
        for state in list(link.states.values()):
            state.close_event, state.close_reason = "closed", reason
            try:
                await self.sio.disconnect(state.sid, namespace=state.namespace)
            except Exception:
                _log.exception("disconnecting %s failed", state.sid)


def _size(pkt: Any) -> int:
    """An Engine.IO packet's size in bytes as queued (text counted in characters)."""
    data = pkt.data
    return len(data) if isinstance(data, str | bytes) else 0


def replayed_up_to(stream: str, last_sent: int) -> Callable[[Queued], bool]:
    """Whether a held packet is a buffered event of ``stream`` the replay already sent."""

    def duplicate(item: Queued) -> bool:
        emission = item.emission
        return (
            emission is not None
            and emission.stream == stream
            and emission.event_id is not None
            and emission.event_id <= last_sent
        )

    return duplicate
