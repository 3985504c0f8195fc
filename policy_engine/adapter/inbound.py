"""The adapter's incoming half below events: every Socket.IO packet a client sends, held to
the policy before python-socketio decodes it.

It replaces the Engine.IO ``message`` handler of python-socketio (``_handle_eio_message``)
with :meth:`Inbound.message`, which dispatches to the same server methods, so that:

- each message is measured where it is assembled: a binary event's size is its text part
  plus every attachment, whichever Engine.IO message (or long-polling request) brought
  them, and reaches the event hook through :data:`INBOUND_SIZE`;
- a packet larger than its event's ``max_bytes``, or nested deeper than
  ``connections.protocol.max_depth``, is answered before its JSON is decoded;
- a malformed packet is a protocol error of its connection, never a traceback: counted,
  logged at most once per connection and kind per interval, and the connection closed with
  a classified payload past ``connections.protocol.max_errors``. A broken binary packet is
  discarded, so the connection carries on instead of waiting for attachments for ever.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from socketio import packet as sio_packet

from policy_engine.adapter.asgi import MALFORMED, OVERSIZED_BINARY
from policy_engine.core.engine import Engine
from policy_engine.core.payload import (
    PAYLOAD_TOO_LARGE,
    PROTOCOL_ERRORS,
    PROTOCOL_INVALID,
    UNKNOWN_EVENT,
    ClientPayload,
)
from policy_engine.language.model import PolicySet
from policy_engine.observe.logs import ProtocolErrorLog

# The size of the packet being handled, set where its last piece arrives and read by the
# event hook in the task python-socketio starts for it (tasks copy the context).
INBOUND_SIZE: ContextVar[int] = ContextVar("policy_engine_inbound_size", default=0)

_EVENT, _BINARY_EVENT = sio_packet.EVENT, sio_packet.BINARY_EVENT
_ACK, _BINARY_ACK = sio_packet.ACK, sio_packet.BINARY_ACK
_CONNECT, _DISCONNECT = sio_packet.CONNECT, sio_packet.DISCONNECT
_BINARY = frozenset({_BINARY_EVENT, _BINARY_ACK})
# Packet types as the first character of a text packet: what is checked before decoding.
_EVENTS = frozenset({str(_EVENT), str(_BINARY_EVENT)})
_BINARY_TEXT = frozenset({str(_BINARY_EVENT), str(_BINARY_ACK)})
_SCREENED = _EVENTS | {str(_ACK), str(_BINARY_ACK)}
# Names python-socketio gives its own meaning to: sent as an event, one would reach the
# application's (or an instrumented admin UI's) connect or disconnect handling.
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting"})
# A JSON string (brackets inside it are not structure), and what is left that is structure.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_HEADER = re.compile(r"(\d)(?:(\d{1,10})-)?(/[^,]*,?)?(\d{1,100})?")
# Engine.IO's buffer is kept at this multiple of the largest max_bytes, so an event somewhat
# over its limit reaches the policy instead of closing the transport.
BUFFER_HEADROOM = 2
_UNBOUNDED = 1 << 62

Answer = Callable[[str, str, Any, ClientPayload], Awaitable[None]]
"""Give a client a refusal: ``(eio_sid, namespace, ack id, payload)``."""
Close = Callable[[str, ClientPayload], Awaitable[None]]
"""Close an Engine.IO connection with a payload: ``(eio_sid, payload)``."""


@dataclass(slots=True)
class Pending:
    """A binary packet waiting for its attachments, and its size so far."""

    packet: Any
    size: int
    discard: bool = False  # refused already: its remaining attachments are swallowed


@dataclass(slots=True)
class Limits:
    """What one policy asks of incoming packets, derived once per policy."""

    policy: PolicySet
    smallest: int  # no event may be larger: below it, no size needs checking
    largest: int  # the largest max_bytes of the policy (0: none)
    max_depth: int


@dataclass(slots=True)
class Faults:
    """One connection's protocol errors."""

    count: int = 0
    closing: bool = False


def limits_of(policy: PolicySet) -> Limits:
    specs = (*policy.events.values(), policy.default_event)
    bounded = [spec.max_bytes for spec in specs if spec.max_bytes is not None]
    return Limits(
        policy,
        smallest=min(bounded, default=_UNBOUNDED),
        largest=max(bounded, default=0),
        max_depth=policy.connections.protocol.max_depth,
    )


def nesting_depth(text: str, start: int) -> int:
    """The deepest nesting of the JSON text from ``start`` (strings skipped), not decoded."""
    structure = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text[start:]))
    return max(accumulate(_DEPTH_STEP[c] for c in structure), default=0)


def header(text: str) -> tuple[str, Any, int]:
    """A text packet's namespace, ack id and where its JSON begins, read as python-socketio
    reads them but without decoding the JSON."""
    match = _HEADER.match(text)
    if match is None:
        return "/", None, len(text)
    namespace = (match.group(3) or "/").rstrip(",").split("?", 1)[0] or "/"
    ack = int(match.group(4)) if match.group(4) else None
    return namespace, ack, match.end()


class Inbound:
    """The replacement for python-socketio's Engine.IO ``message`` handler on one server.

    ``answer`` reports a refusal and sends it to the client (as the ack it asked for, else
    as ``error_event``); ``close`` ends a connection past ``max_errors``.
    """

    def __init__(
        self,
        sio: Any,
        engine: Engine,
        *,
        answer: Answer,
        close: Close,
        log: ProtocolErrorLog | None = None,
    ) -> None:
        self.sio = sio
        self.engine = engine
        self.log = log or ProtocolErrorLog()
        self._answer = answer
        self._close = close
        self._pending: dict[str, Pending] = {}
        self._faults: dict[str, Faults] = {}
        self._configured_buffer: int = sio.eio.max_http_buffer_size
        # Starts an oversized frame's notice (see asgi.OversizedFrames); no packet can.
        self.marker = f"\x00{secrets.token_hex(16)}:"
        self._binary_notice = self.marker + OVERSIZED_BINARY
        self._limits = self._align(engine.policy)

    def install(self) -> None:
        self.sio.eio.on("message", self.message)

    def prune(self) -> None:
        """Forget what belongs to Engine.IO connections that are gone."""
        sockets = self.sio.eio.sockets
        for table in (self._pending, self._faults):
            for eio_sid in [sid for sid in table if sid not in sockets]:
                del table[eio_sid]

    def _align(self, policy: PolicySet) -> Limits:
        """This policy's limits; Engine.IO's buffer is raised to make its sizes reachable."""
        limits = limits_of(policy)
        self.sio.eio.max_http_buffer_size = max(
            self._configured_buffer, BUFFER_HEADROOM * limits.largest
        )
        return limits

    # -- dispatch ----------------------------------------------------------------------------

    async def message(self, eio_sid: str, data: Any) -> None:
        """python-socketio's ``_handle_eio_message``, the protocol held to the policy."""
        try:
            pending = self._pending.get(eio_sid) if self._pending else None
            if pending is not None:
                if type(data) is not str:
                    await self._attachment(eio_sid, pending, data, len(data))
                    return
                if data.startswith(self._binary_notice):  # an attachment over the limit
                    size = int(data[len(self._binary_notice) :])
                    await self._attachment(eio_sid, pending, None, size)
                    return
                del self._pending[eio_sid]
                await self.fault(eio_sid, "missing_attachment")
            limits = self._limits
            if limits.policy is not self.engine.policy:
                limits = self._limits = self._align(self.engine.policy)
            if type(data) is str:
                size = len(data) if data.isascii() else len(data.encode())
                if (
                    size > limits.smallest or data.count("[") + data.count("{") > limits.max_depth
                ) and await self._screened_out(eio_sid, data, size, limits):
                    return
            else:
                size = len(data)  # a whole packet in binary (a msgpack server)
            pkt = self.sio.packet_class(encoded_packet=data)
            if pkt.packet_type == _EVENT and self._plain_event(eio_sid, pkt):
                # The common case, handed on here: no coroutine of _dispatch's per event.
                INBOUND_SIZE.set(size)
                await self.sio._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
                return
            await self._dispatch(eio_sid, pkt, size)
        except Exception as exc:  # client input python-socketio could not read
            self._pending.pop(eio_sid, None)
            if type(data) is str and data.startswith(self.marker):
                await self._oversized(eio_sid, data[len(self.marker) :])
            else:
                await self.fault(eio_sid, "malformed", exc)
                if type(data) is str:
                    await self._unreadable(eio_sid, data)

    async def _dispatch(self, eio_sid: str, pkt: Any, size: int) -> None:
        sio = self.sio
        kind = pkt.packet_type
        if kind == _EVENT:
            if await self._valid_event(eio_sid, pkt):
                INBOUND_SIZE.set(size)
                await sio._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind == _ACK:
            await sio._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind == _CONNECT:
            await sio._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif kind == _DISCONNECT:
            await sio._handle_disconnect(eio_sid, pkt.namespace, sio.reason.CLIENT_DISCONNECT)
        elif kind in _BINARY and pkt.attachment_count > 0:
            valid = kind == _BINARY_ACK or await self._valid_event(eio_sid, pkt)
            self._pending[eio_sid] = Pending(pkt, size, discard=not valid)
        else:  # CONNECT_ERROR, an unknown type, or a binary packet without attachments
            await self.fault(eio_sid, "unexpected_packet")

    def _plain_event(self, eio_sid: str, pkt: Any) -> bool:
        """Whether an event packet passes :meth:`_valid_event` with nothing to answer: a
        list opening with a name of the application's, on a connected namespace."""
        data = pkt.data
        return (
            type(data) is list
            and bool(data)
            and type(data[0]) is str
            and data[0] not in RESERVED_EVENTS
            and self.sio.manager.sid_from_eio_sid(eio_sid, pkt.namespace or "/") is not None
        )

    async def _valid_event(self, eio_sid: str, pkt: Any) -> bool:
        """Whether an event packet may reach python-socketio (which would raise, or ignore
        it without a word); answers an ack-requesting event to an unconnected namespace."""
        data = pkt.data
        if type(data) is not list or not data or type(data[0]) is not str:
            await self.fault(eio_sid, "malformed_event")
            return False
        namespace = pkt.namespace or "/"
        if data[0] in RESERVED_EVENTS:
            detail = f"{data[0]!r} is a reserved event name"
            payload = PROTOCOL_INVALID.payload("connections/protocol", detail=detail)
            await self._answer(eio_sid, namespace, pkt.id, payload)
            await self.fault(eio_sid, "reserved_event")
            return False
        if self.sio.manager.sid_from_eio_sid(eio_sid, namespace) is not None:
            return True
        protocol = self.engine.policy.connections.protocol
        if pkt.id is not None and protocol.answer_unknown_events:
            payload = UNKNOWN_EVENT.payload("connections/protocol")
            await self._answer(eio_sid, namespace, pkt.id, payload)
        return False

    async def _attachment(self, eio_sid: str, pending: Pending, data: Any, size: int) -> None:
        """One attachment of a pending binary packet; ``data`` is None for one over Engine.IO's
        limit, of which only the size is known: its packet is refused whatever its spec."""
        pending.size += size
        pkt = pending.packet
        if not pending.discard and pkt.packet_type == _BINARY_EVENT:
            spec = self.engine.policy.event(pkt.data[0])
            limit = spec.max_bytes
            if limit is None and data is None:
                limit = self.sio.eio.max_http_buffer_size
            if limit is not None and pending.size > limit:
                pending.discard = True
                refusal = PAYLOAD_TOO_LARGE.payload(f"events/{spec.name}", max_bytes=limit)
                await self._answer(eio_sid, pkt.namespace or "/", pkt.id, refusal)
        pending.discard = pending.discard or data is None
        try:
            if pending.discard:
                pkt.attachments.append(None)
                complete = len(pkt.attachments) >= pkt.attachment_count
            else:
                complete = pkt.add_attachment(data)
        except Exception as exc:  # a placeholder that names no attachment
            del self._pending[eio_sid]
            await self.fault(eio_sid, "bad_attachment", exc)
            return
        if not complete:
            return
        del self._pending[eio_sid]
        if pending.discard:
            return
        INBOUND_SIZE.set(pending.size)
        if pkt.packet_type == _BINARY_EVENT:
            await self.sio._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        else:
            await self.sio._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)

    # -- refusals before decoding --------------------------------------------------------------

    async def _screened_out(self, eio_sid: str, text: str, size: int, limits: Limits) -> bool:
        """Refuse an event too large for its spec, or an event or ack nested too deep,
        without decoding it; an event is answered, an ack (no one waits for it) dropped."""
        screened = screen(text, size, limits)
        if screened is None:
            return False
        namespace, ack, payload, too_deep = screened
        if too_deep:
            await self.fault(eio_sid, "too_deep")
        kind = text[:1]
        if kind in _BINARY_TEXT:  # its attachments follow: swallow them
            self._pending[eio_sid] = Pending(_Discarded(text), size, discard=True)
        if kind in _EVENTS:
            await self._answer(eio_sid, namespace, ack, payload)
        return True

    async def _unreadable(self, eio_sid: str, text: str) -> None:
        """Answer an event python-socketio could not decode (say, a 101-digit integer) if it
        asked for an ack, and swallow the attachments of a binary one."""
        kind = text[:1]
        if kind not in _EVENTS:
            return
        if kind in _BINARY_TEXT:
            self._pending[eio_sid] = Pending(_Discarded(text), len(text), discard=True)
        namespace, ack, _ = header(text)
        if ack is not None:
            detail = "the event's arguments could not be decoded"
            payload = PROTOCOL_INVALID.payload("connections/protocol", detail=detail)
            await self._answer(eio_sid, namespace, ack, payload)

    async def _oversized(self, eio_sid: str, notice: str) -> None:
        """Answer a frame Engine.IO could not take, from its size and its first bytes."""
        if notice == MALFORMED:  # a packet Engine.IO could not read at all
            await self.fault(eio_sid, "malformed")
            return
        if notice.startswith(OVERSIZED_BINARY):  # an attachment no binary packet announced
            await self.fault(eio_sid, "unexpected_packet")
            return
        _, _, head = notice.partition(":")  # the frame's size, then its start
        namespace, ack, start = header(head)
        spec = self.engine.policy.event(_event_name(head, start))
        limit = spec.max_bytes if spec.max_bytes is not None else self.sio.eio.max_http_buffer_size
        payload = PAYLOAD_TOO_LARGE.payload(f"events/{spec.name}", max_bytes=limit)
        await self._answer(eio_sid, namespace, ack, payload)

    # -- protocol errors -----------------------------------------------------------------------

    async def fault(self, eio_sid: str, kind: str, exc: BaseException | None = None) -> None:
        """Count one protocol error of a connection; past the policy's limit, close it."""
        faults = self._faults.get(eio_sid)
        if faults is None:
            if eio_sid not in self.sio.eio.sockets:
                return
            faults = self._faults[eio_sid] = Faults()
        faults.count += 1
        detail = f"{type(exc).__name__}: {exc}"[:200] if exc is not None else ""
        self.log.report(eio_sid, kind, detail, time.monotonic())
        limit = self.engine.policy.connections.protocol.max_errors
        if limit and faults.count > limit and not faults.closing:
            faults.closing = True
            payload = PROTOCOL_ERRORS.payload("connections/protocol", count=faults.count)
            await self._close(eio_sid, payload)

    def faults(self, eio_sid: str) -> int:
        """The protocol errors counted for an Engine.IO connection so far."""
        faults = self._faults.get(eio_sid)
        return faults.count if faults is not None else 0


class _Discarded:
    """Stands for a binary packet refused before decoding while its attachments arrive."""

    def __init__(self, text: str) -> None:
        count = _HEADER.match(text)
        self.attachment_count = int(count.group(2)) if count and count.group(2) else 0
        self.attachments: list[Any] = []
        self.data = None
        self.namespace = None
        self.id = None


def screen(text: str, size: int, limits: Limits) -> tuple[str, Any, ClientPayload, bool] | None:
    """What refuses a text packet before it is decoded: an event too large for its spec,
    an event or ack nested too deep. None when it may be decoded; else its namespace, ack
    id, the refusal and whether it was its depth (a protocol error)."""
    kind = text[:1]
    if kind not in _SCREENED:
        return None
    namespace, ack, start = header(text)
    if kind in _EVENTS and size > limits.smallest:
        spec = limits.policy.event(_event_name(text, start))
        if spec.max_bytes is not None and size > spec.max_bytes:
            payload = PAYLOAD_TOO_LARGE.payload(f"events/{spec.name}", max_bytes=spec.max_bytes)
            return namespace, ack, payload, False
    if text.count("[", start) + text.count("{", start) <= limits.max_depth:
        return None
    if nesting_depth(text, start) <= limits.max_depth:
        return None
    detail = f"nested deeper than {limits.max_depth} levels"
    payload = PROTOCOL_INVALID.payload("connections/protocol", detail=detail)
    return namespace, ack, payload, True


def _event_name(text: str, start: int) -> str:
    """The event name that opens a packet's JSON array, read alone (not the arguments)."""
    if text[start : start + 2] != '["':
        return ""
    match = _JSON_STRING.match(text, start + 1)
    if match is None:
        return ""
    name = match.group()[1:-1]
    return name if "\\" not in name else ""
