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
    """Replaces a WebSocket text frame over Engine.IO's limit with a short notice.

    Engine.IO closes the transport on such a frame, before the policy could say why; the
    notice instead reaches the adapter as a message (``marker``, the frame's size in bytes,
    ``:`` and the start of the frame, enough for its namespace, ack id and event name), and
    the adapter answers ``PAYLOAD_TOO_LARGE``. ``marker`` is a secret of the process, so a
    client cannot forge a notice. Frames over the ASGI server's own limit (uvicorn's
    ``ws_max_size``) never get this far; long-polling requests are Engine.IO's to refuse.
    """

    HEAD = 512

    def __init__(
        self, app: ASGIApp, limit: Callable[[], int], marker: str, socketio_path: str
    ) -> None:
        self.app = app
        self.limit = limit
        self.marker = marker
        self.path = "/" + socketio_path.strip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or not str(scope.get("path", "")).startswith(self.path):
            await self.app(scope, receive, send)
            return

        async def checked() -> Message:
            message = await receive()
            text = message.get("text")
            if text is not None and len(text) > self.limit() and text[:1] == "4":
                size = len(text) if text.isascii() else len(text.encode())
                notice = f"4{self.marker}{size}:{text[1 : 1 + self.HEAD]}"
                message = {"type": "websocket.receive", "text": notice}
            return message

        await self.app(scope, checked, send)
