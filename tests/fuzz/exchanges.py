"""One fuzzed conversation on a fresh connection: what was sent and how it was answered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp

from .harness import Exchange, await_answer, expected_answer, fresh_address, leaked_internals
from .strategies import Event, RawPacket, raw_event_text
from .wire import Wire, encode_event, open_wire

ANSWER_WAIT = 1.0
PROBE_ACK = 900_001


@dataclass
class Conversation:
    """The exchanges of one connection, the internals it read, and whether it connected."""

    transport: str
    connected: bool = False
    refused: str = ""
    exchanges: list[Exchange] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    stalled: list[str] = field(default_factory=list)


async def join(wire: Wire) -> str:
    """Join the default namespace; returns "" when joined, else what the server said."""
    await wire.send("40")
    joined = lambda: any(p[:1] in ("0", "4") for p in wire.socketio_packets())  # noqa: E731
    await wire.until(joined, ANSWER_WAIT)
    replies = [p for p in wire.socketio_packets() if p[:1] in ("0", "4")]
    if replies and replies[0].startswith("0"):
        return ""
    return replies[0] if replies else f"no answer to connect (closed={wire.closed})"


async def send_event(wire: Wire, event: Event, ack_id: int, wait: float) -> Exchange:
    await wire.send(raw_event_text(event, ack_id))
    for blob in event.attachments:
        await wire.send_binary(blob)
    return await await_answer(wire, ack_id, expected_answer(event), wait)


@asynccontextmanager
async def connection(url: str, transport: str) -> AsyncIterator[tuple[Wire, Conversation]]:
    """A fresh connection from an address of its own, joined to the default namespace."""
    result = Conversation(transport)
    async with aiohttp.ClientSession() as session:
        wire = await open_wire(session, url, transport, headers=fresh_address())
        try:
            result.refused = await join(wire)
            result.connected = not result.refused
            yield wire, result
            result.leaks = leaked_internals(wire)
        finally:
            result.stalled = wire.stalled
            await wire.close()


async def converse(
    url: str, transport: str, events: list[Event], wait: float = ANSWER_WAIT
) -> Conversation:
    """Send ``events`` one at a time, each with an ack id, on a fresh connection."""
    async with connection(url, transport) as (wire, result):
        for number, event in enumerate(events, start=1):
            if not result.connected:
                break
            exchange = await send_event(wire, event, number, wait)
            result.exchanges.append(exchange)
            if exchange.closed:
                break
    return result


async def send_raw(wire: Wire, packet: RawPacket) -> bool:
    """Send ``packet`` as it is; rejoin the namespace if it was a (legitimate) leave.

    Returns True when the packet closed the Engine.IO session itself (a client may): then
    nothing more is owed on this connection."""
    for text in packet.texts:
        await wire.send(text)
        if closes_session(text):
            return True
    for blob in packet.binaries:
        await wire.send_binary(blob)
    if any(leaves_namespace(text) for text in packet.texts):
        await wire.send("40")
    return False


async def abuse(url: str, transport: str, packets: list[RawPacket]) -> Conversation:
    """Send raw ``packets``, then one well-formed echo that must still be answered."""
    async with connection(url, transport) as (wire, result):
        if result.connected:
            for packet in packets:
                if transport == "websocket" and not all(utf8(text) for text in packet.texts):
                    # RFC 6455, 8.1: a text frame that is not UTF-8 fails the connection
                    # at the transport, before anything above it could answer.
                    await send_raw(wire, packet)
                    return result
                if await send_raw(wire, packet):
                    return result
            await wire.send(encode_event("echo", ["probe"], PROBE_ACK))
            result.exchanges.append(await await_answer(wire, PROBE_ACK, ["probe"], ANSWER_WAIT))
    return result


def utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def closes_session(text: str) -> bool:
    """Whether ``text`` is an Engine.IO CLOSE packet: the client ends its own session."""
    return text[:1] == "1"


def leaves_namespace(text: str) -> bool:
    """Whether ``text`` is a Socket.IO DISCONNECT of the default namespace (the client may)."""
    return text.startswith("41") and text[2:3] != "/"
