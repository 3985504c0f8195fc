"""The ASGI edge of the adapter: the types of an ASGI application, the lifespan that starts
and stops the adapter around the application's own, and the WebSocket frame check that lets
the policy answer a frame too large for Engine.IO."""

from __future__ import annotations

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
        async def checked() -> Message:
            message = await receive()
            text = message.get("text")
            if text is None:
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

    async def _readable_post(
        self, scope: Scope, receive: Receive, send: Send, headers: list[Any]
    ) -> None:
        """A long-polling body Engine.IO can take: each packet it could not read (not UTF-8,
        no packet type) becomes the malformed notice, so the adapter counts it as a protocol
        error instead of Engine.IO logging a traceback and refusing the whole request."""
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        packets = body.split(b"\x1e")
        fixed = [p if _readable(p) else self.malformed.encode() for p in packets]
        if fixed != packets:
            body = b"\x1e".join(fixed)
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

        await self.app(scope, replayed, send)

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers") or []
        length = next((value for name, value in headers if name == b"content-length"), b"0")
        limit = self.limit()
        if length.isdigit() and 0 < int(length) <= limit:
            await self._readable_post(scope, receive, send, headers)
            return
        if not length.isdigit() or not limit < int(length) <= self.DRAIN * limit:
            await self.app(scope, receive, send)
            return
        first = await receive()
        body = first.get("body", b"")
        if body[:1] != b"4":  # not a message: Engine.IO refuses it as it would have
            replayed = [first]

            async def again() -> Message:
                return replayed.pop() if replayed else await receive()

            await self.app(scope, again, send)
            return
        head, size, more = body[: 2 * self.HEAD], len(body), first.get("more_body", False)
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        notice = self._notice(size, head.decode("utf-8", "ignore")).encode()
        sent = False

        async def replaced() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": notice, "more_body": False}

        fixed = [(n, v) for n, v in headers if n != b"content-length"]
        fixed.append((b"content-length", str(len(notice)).encode()))
        await self.app({**scope, "headers": fixed}, replaced, send)


ENGINEIO_TYPES = frozenset("0123456")
"""The first character of every Engine.IO packet a client may send as text."""

MALFORMED = "!"
"""What follows the marker in the notice of a packet Engine.IO could not read."""


def _readable(packet: bytes) -> bool:
    """Whether Engine.IO can decode one packet of a long-polling body."""
    if packet[:1] == b"b":  # base64-encoded binary
        return True
    try:
        text = packet.decode()
    except UnicodeDecodeError:
        return False
    return text[:1] in ENGINEIO_TYPES
