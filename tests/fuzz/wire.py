"""Raw Engine.IO v4 clients on both transports, so a test can send bytes no library would.

``socketio.AsyncClient`` only sends well-formed packets; a hostile client does not. These
speak the wire protocol by hand over aiohttp: a WebSocket (one frame per packet) and
long-polling (POSTs of ``\\x1e``-separated packets, one GET at a time for what comes
back). Both answer the server's pings, so a long run is not closed for silence, and both
expose the same small interface: ``send``, ``send_binary``, ``received`` and ``closed``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

WAIT = 5.0
# A request the server has not answered by then is a stalled request: a failure of its own.
REQUEST_TIMEOUT = 30.0
Packet = str | bytes


class Wire:
    """One Engine.IO session: what the server sent, in order, and whether it ended."""

    def __init__(self, session: aiohttp.ClientSession, base: str, headers: Mapping[str, str]):
        self.session = session
        self.base = base
        self.headers = dict(headers)
        self.received: list[Packet] = []
        self.closed = False
        self.stalled: list[str] = []  # requests the server never answered (their start)
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        raise NotImplementedError

    async def send(self, text: str) -> None:
        raise NotImplementedError

    async def send_binary(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def _deliver(self, packet: Packet) -> None:
        self.received.append(packet)
        self._changed.set()

    def _end(self) -> None:
        self.closed = True
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Wait until ``condition()`` holds or the session ends; False on timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.closed:
                return condition()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return condition()
        return True

    def socketio_packets(self) -> list[str]:
        """The Engine.IO message packets (``4...``) received, without the ``4``."""
        return [p[1:] for p in self.received if isinstance(p, str) and p.startswith("4")]


class WebSocketWire(Wire):
    transport = "websocket"

    async def open(self) -> None:
        url = f"{self.base}&transport=websocket"
        self._ws = await self.session.ws_connect(
            url, headers=self.headers, max_msg_size=0, autoping=True
        )
        self._reader = asyncio.create_task(self._read())
        if not await self.until(lambda: bool(self.received)):
            raise ConnectionError("no Engine.IO handshake")
        if not isinstance(self.received[0], str) or not self.received[0].startswith("0"):
            raise ConnectionError(f"unexpected handshake {self.received[0]!r}")

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    if message.data == "2":
                        await self._ws.send_str("3")
                        continue
                    self._deliver(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    self._deliver(message.data)
                else:
                    break
        except (aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._end()

    async def send(self, text: str) -> None:
        if not self.closed:
            try:
                # Lone surrogates go out as they are: invalid UTF-8 is hostile input too.
                frame = text.encode("utf-8", "surrogatepass")
                await self._ws.send_frame(frame, aiohttp.WSMsgType.TEXT)
            except (aiohttp.ClientError, ConnectionError):
                self._end()

    async def send_binary(self, data: bytes) -> None:
        if not self.closed:
            try:
                await self._ws.send_bytes(data)
            except (aiohttp.ClientError, ConnectionError):
                self._end()

    async def close(self) -> None:
        await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


class PollingWire(Wire):
    transport = "polling"
    sid = ""

    async def open(self) -> None:
        async with self.session.get(
            f"{self.base}&transport=polling", headers=self.headers
        ) as response:
            body = await response.text()
        if response.status != 200 or not body.startswith("0"):
            raise ConnectionError(f"handshake refused: {response.status} {body[:200]!r}")
        self.received.append(body)
        self.sid = json.loads(body[1:])["sid"]
        self._url = f"{self.base}&transport=polling&sid={self.sid}"
        self._reader = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        try:
            while True:
                async with self.session.get(self._url, headers=self.headers) as response:
                    body = await response.text()
                    if response.status != 200:
                        break
                for packet in body.split("\x1e"):
                    if packet == "2":
                        await self._post("3")
                    elif packet.startswith("b"):
                        self._deliver(base64.b64decode(packet[1:]))
                    elif packet == "1":
                        return
                    elif packet == "":
                        continue
                    else:
                        self._deliver(packet)
        except (aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._end()

    async def _post(self, body: str) -> None:
        if self.closed:
            return
        try:
            async with self.session.post(
                self._url,
                data=body.encode("utf-8", "surrogatepass"),
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as response:
                await response.read()
                if response.status != 200:
                    self._end()
        except TimeoutError:
            self.stalled.append(body[:200])
            self._end()
        except (aiohttp.ClientError, ConnectionError):
            self._end()

    async def send(self, text: str) -> None:
        await self._post(text)

    async def send_binary(self, data: bytes) -> None:
        await self._post("b" + base64.b64encode(data).decode("ascii"))

    async def close(self) -> None:
        await self._post("1")
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


TRANSPORTS: dict[str, type[Wire]] = {"websocket": WebSocketWire, "polling": PollingWire}


async def open_wire(
    session: aiohttp.ClientSession,
    url: str,
    transport: str,
    *,
    query: str = "conversation_id=fuzz",
    headers: Mapping[str, str] | None = None,
) -> Wire:
    """An Engine.IO session on ``transport``; the Socket.IO namespace is not joined yet."""
    wire = TRANSPORTS[transport](session, f"{url}/socket.io/?EIO=4&{query}", headers or {})
    await wire.open()
    return wire


def encode_event(name: Any, args: list[Any], ack: int | None) -> str:
    """A Socket.IO EVENT packet as the ``4``-prefixed Engine.IO message."""
    body = json.dumps([name, *args], separators=(",", ":"))
    return f"42{'' if ack is None else ack}{body}"


def acks(received: list[Packet]) -> dict[int, list[Any]]:
    """Every Socket.IO ACK in ``received`` by id, binary acks (``46``) reassembled."""
    found: dict[int, list[Any]] = {}
    index = 0
    while index < len(received):
        packet = received[index]
        index += 1
        if not isinstance(packet, str) or packet[:2] not in ("43", "46"):
            continue
        rest = packet[2:]
        attachments = 0
        if packet[1] == "6":
            count, _, rest = rest.partition("-")
            attachments = int(count) if count.isdigit() else 0
        if rest.startswith("/"):
            rest = rest[rest.index(",") + 1 :] if "," in rest else ""
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if not digits:
            continue
        try:
            data = json.loads(rest[digits:])
        except ValueError:
            continue
        blobs = [p for p in received[index : index + attachments] if isinstance(p, bytes)]
        if len(blobs) < attachments:
            continue  # its attachments are still on the way
        index += attachments
        found[int(rest[:digits])] = _fill(data, blobs)
    return found


def _fill(value: Any, blobs: list[bytes]) -> Any:
    if isinstance(value, dict):
        if value.get("_placeholder") is True and isinstance(value.get("num"), int):
            number = value["num"]
            return blobs[number] if 0 <= number < len(blobs) else value
        return {key: _fill(item, blobs) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, blobs) for item in value]
    return value
