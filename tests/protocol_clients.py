"""Raw Engine.IO clients for the protocol tests: they send what a real client library would
never send (malformed packets, stray attachments, binary events split across requests)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import aiohttp

WAIT = 10.0


class RawWebSocket:
    """One Engine.IO v4 connection over a WebSocket, Socket.IO packets sent as text."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.session = session
        self.ws = ws

    @classmethod
    async def open(
        cls, url: str, headers: dict[str, str] | None = None, query: str = "conversation_id=c1"
    ) -> RawWebSocket:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(
            f"{url}/socket.io/?EIO=4&transport=websocket&{query}",
            headers=headers or {},
            max_msg_size=0,
        )
        raw = cls(session, ws)
        opened = await raw.receive()
        assert opened.startswith("0"), opened
        return raw

    async def connect(self, namespace: str = "/") -> None:
        await self.send("0" if namespace == "/" else f"0{namespace},")
        answer = await self.receive()
        assert answer.startswith("40"), answer

    async def send(self, socketio_packet: str) -> None:
        await self.ws.send_str("4" + socketio_packet)

    async def send_binary(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def receive(self, timeout: float = WAIT) -> str:
        """The next text message that is not a ping (pings are answered)."""
        while True:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
            if message.type is not aiohttp.WSMsgType.TEXT:
                return f"<{message.type.name}>"
            text: str = message.data
            if text == "2":
                await self.ws.send_str("3")
                continue
            return text

    async def until(self, prefix: str, timeout: float = WAIT) -> str:
        """Skip messages until one starting with ``prefix``."""
        async with asyncio.timeout(timeout):
            while True:
                text = await self.receive()
                if text.startswith(prefix) or text.startswith("<"):
                    return text

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


class RawPolling:
    """One Engine.IO v4 connection over long-polling: each ``post`` is its own request."""

    def __init__(self, session: aiohttp.ClientSession, base: str, headers: dict[str, str]):
        self.session = session
        self.base = base
        self.headers = headers

    @classmethod
    async def open(
        cls, url: str, headers: dict[str, str] | None = None, query: str = "conversation_id=c1"
    ) -> RawPolling:
        session = aiohttp.ClientSession()
        base = f"{url}/socket.io/?EIO=4&transport=polling&{query}"
        async with session.get(base, headers=headers or {}) as response:
            handshake = await response.text()
        sid = json.loads(handshake[1:])["sid"]
        return cls(session, f"{base}&sid={sid}", dict(headers or {}))

    async def post(self, *engineio_packets: str) -> int:
        body = io.BytesIO("\x1e".join(engineio_packets).encode())
        async with self.session.post(self.base, data=body, headers=self.headers) as response:
            await response.read()
            return response.status

    async def poll(self) -> list[str]:
        """The packets of one GET, pings answered."""
        async with self.session.get(self.base, headers=self.headers) as response:
            body = await response.text()
        packets = body.split("\x1e")
        if "2" in packets:
            await self.post("3")
        return [p for p in packets if p != "2"]

    async def until(self, prefix: str, timeout: float = WAIT) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for packet in await self.poll():
                    if packet.startswith(prefix):
                        return packet

    async def close(self) -> None:
        await self.session.close()


def binary(data: bytes) -> str:
    """An attachment as Engine.IO v4 long-polling carries it."""
    return "b" + base64.b64encode(data).decode()


def ack_payload(packet: str, prefix: str) -> Any:
    """The first argument of an ack packet ``prefix[...]``."""
    assert packet.startswith(prefix), packet
    return json.loads(packet[len(prefix) :])[0]
