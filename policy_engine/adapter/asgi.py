"""The ASGI edge of the adapter: the types of an ASGI application, the lifespan that starts
and stops the adapter around the application's own, and the WebSocket frame check that lets
the policy answer a frame too large for Engine.IO."""

from __future__ import annotations

import binascii
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Lifespan:
    """Runs the adapter's start/stop around the wrapped application's own lifespan."""

    def __init__(
        self,
        app: ASGIApp,
        startup: Callable[[], Awaitable[None]],
        shutdown: Callable[[], Awaitable[None]],
    ) -> None:
        self.app = app
        self.startup = startup
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def hooked() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        await self.app(scope, hooked, send)


class OversizedFrames:
    """Replaces a message over Engine.IO's limit with a short notice the adapter answers.

    Engine.IO closes a WebSocket on a frame larger than its buffer, and refuses such a
    long-polling request with 400, before the policy could say why. Here the frame (or the
    request's body, read and let go of as it arrives) becomes a notice instead: ``marker``,
    the size in bytes, ``:`` and the start of the message, enough for its namespace, ack id
    and event name; the adapter answers ``PAYLOAD_TOO_LARGE``. ``marker`` is a secret of
    the process, so a client cannot forge a notice. Frames over the ASGI server's own limit
    (uvicorn's ``ws_max_size``) never get this far, and a request over ``DRAIN`` times the
    buffer is left to Engine.IO, which refuses it without reading it.
    """

    HEAD = 512
    DRAIN = 16

    def __init__(
        self, app: ASGIApp, limit: Callable[[], int], marker: str, socketio_path: str
    ) -> None:
        self.app = app
        self.limit = limit
        self.marker = marker
        self.path = "/" + socketio_path.strip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not str(scope.get("path", "")).startswith(self.path):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.app(scope, self._frames(receive), send)
        elif scope["type"] == "http" and scope.get("method") == "POST":
            await self._post(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _notice(self, size: int, head: str) -> str:
        return f"4{self.marker}{size}:{head[1 : 1 + self.HEAD].split(chr(0x1E), 1)[0]}"

    def _frames(self, receive: Receive) -> Receive:
        limit = self.limit

        async def checked() -> Message:
            message = await receive()
            text = message.get("text")
            if text is not None and text[:1] in ENGINEIO_TYPES and len(text) <= limit():
                return message  # every frame of a well-behaved client: nothing to change
            if text is None:
                data = message.get("bytes")
                if data is not None and len(data) > self.limit():
                    return {"type": "websocket.receive", "text": self._binary_notice(len(data))}
                return message
            if text[:1] not in ENGINEIO_TYPES:
                # Engine.IO would close the transport on it, with no word to the client.
                return {"type": "websocket.receive", "text": self.malformed}
            if len(text) > self.limit() and text[:1] == "4":
                size = len(text) if text.isascii() else len(text.encode())
                message = {"type": "websocket.receive", "text": self._notice(size, text)}
            return message

        return checked

    @property
    def malformed(self) -> str:
        """The notice standing for a packet Engine.IO cannot read: a protocol error."""
        return f"4{self.marker}{MALFORMED}"

    def _binary_notice(self, size: int) -> str:
        """The notice standing for an attachment (a binary frame) over Engine.IO's limit."""
        return f"4{self.marker}{OVERSIZED_BINARY}{size}"

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A long-polling body, packet by packet: each packet Engine.IO could not read (not
        UTF-8, no packet type) becomes the malformed notice, each one over the limit its
        size notice, so every event of the request is answered by the policy instead of
        Engine.IO refusing the whole request (or logging a traceback)."""
        headers = scope.get("headers") or []
        length = next((value for name, value in headers if name == b"content-length"), b"0")
        if not length.isdigit() or not 0 < int(length) <= self.DRAIN * self.limit():
            await self.app(scope, receive, send)
            return
        split = await self._packets(receive, self.limit())
        if split is None:
            return  # the client went away
        packets, changed = split
        body = b"\x1e".join(packets)
        if changed:
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            scope = {**scope, "headers": headers}
        sent = False

        async def replayed() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await _answered_or_refused(self.app, scope, replayed, send)

    async def _packets(self, receive: Receive, limit: int) -> tuple[list[bytes], bool] | None:
        """The request's packets as it streams in, a packet over ``limit`` kept only as its
        notice (so no more than the limit is held per packet), and whether any changed."""
        packets: list[bytes] = []
        changed = False
        current, size = bytearray(), 0

        def finish() -> None:
            nonlocal changed
            packet = bytes(current)
            if size > limit:
                packets.append(self._over_limit(packet, size).encode())
                changed = True
            elif _readable(packet):
                packets.append(packet)
            else:
                packets.append(self.malformed.encode())
                changed = True

        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            more = message.get("more_body", False)
            for index, part in enumerate(message.get("body", b"").split(b"\x1e")):
                if index:
                    finish()
                    current, size = bytearray(), 0
                size += len(part)
                if size <= limit:
                    current += part
                elif len(current) < 2 * self.HEAD:
                    current += part[: 2 * self.HEAD - len(current)]
        finish()
        return packets, changed

    def _over_limit(self, head: bytes, size: int) -> str:
        """The notice for one long-polling packet over the limit, from its first bytes."""
        if head[:1] == b"4":
            return self._notice(size, head.decode("utf-8", "ignore"))
        if head[:1] == b"b":  # an attachment, base64-encoded: its decoded size
            return self._binary_notice(size * 3 // 4)
        return self.malformed


async def _answered_or_refused(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run Engine.IO on a long-polling POST; a session it closed a moment ago is a 400.

    Engine.IO keeps a closed socket in its table until the next lookup, and a POST that
    looks it up then fails with ``KeyError`` (a GET gets 400 for the same thing): the
    client would get a 500 and the log a traceback for a request that merely came late.
    """
    started = False

    async def tracked(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, tracked)
    except KeyError:
        if started:
            raise
        body = b"Session is disconnected"
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})


ENGINEIO_TYPES = frozenset("0123456")
"""The first character of every Engine.IO packet a client may send as text."""

MALFORMED = "!"
"""What follows the marker in the notice of a packet Engine.IO could not read."""

OVERSIZED_BINARY = "#"
"""What follows the marker, before its size, in the notice of an attachment over the limit."""


POLLING_TYPES = frozenset("1345")
"""The packets Engine.IO takes in a long-polling body: close, pong, message and upgrade. Any
other (a ping, an open, a noop) makes it refuse the whole request with 400, where over a
WebSocket it is ignored."""


def _readable(packet: bytes) -> bool:
    """Whether Engine.IO can take one packet of a long-polling body."""
    if packet[:1] == b"b":  # base64-encoded binary: Engine.IO decodes it as ASCII text
        if not packet.isascii():
            return False
        try:
            binascii.a2b_base64(packet[1:])
        except binascii.Error:
            return False
        return True
    try:
        text = packet.decode()
    except UnicodeDecodeError:
        return False
    return text[:1] in POLLING_TYPES
