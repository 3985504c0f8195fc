"""The ASGI edge of the adapter: the lifespan that starts and stops it, and the packet class
that measures what arrives.

Both wrap something python-socketio or the ASGI server already owns (the application, the
server's ``packet_class``) instead of changing it, so an application keeps its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The size of the packet being handled, set where Engine.IO hands it over and read by the
# event hook in the task python-socketio starts for it (tasks copy the context).
INBOUND_SIZE: ContextVar[int] = ContextVar("policy_engine_inbound_size", default=0)


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


def measured(packet_class: type[Any]) -> type[Any]:
    """The server's packet class, noting each received packet's size as it is decoded.

    ``event.size_bytes`` is the Socket.IO packet as received: its encoded length in bytes
    (event name, ack id, namespace and JSON payload included), plus the length of every
    binary attachment. The server decodes each incoming packet with ``packet_class`` (the
    class its ``serializer`` option names), synchronously, in the task that then starts
    the event's handler task, which inherits the size through :data:`INBOUND_SIZE`. A text
    packet is ASCII nearly always, which ``isascii()`` tells in O(1); only otherwise is it
    encoded to count. Attachments arrive as further messages on the same transport task.
    """

    decode = packet_class.decode
    add_attachment = packet_class.add_attachment

    class MeasuredPacket(packet_class):  # type: ignore[misc]
        def decode(self, encoded_packet: Any) -> Any:
            if type(encoded_packet) is str:
                size = len(encoded_packet if encoded_packet.isascii() else encoded_packet.encode())
            else:
                size = len(encoded_packet)  # a whole packet in binary (a msgpack server)
            INBOUND_SIZE.set(size)
            return decode(self, encoded_packet)

        def add_attachment(self, attachment: Any) -> Any:
            INBOUND_SIZE.set(INBOUND_SIZE.get() + len(attachment))
            return add_attachment(self, attachment)

    MeasuredPacket.__name__ = MeasuredPacket.__qualname__ = f"Measured{packet_class.__name__}"
    return MeasuredPacket
