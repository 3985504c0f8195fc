"""The private python-socketio and python-engineio names the adapter relies on, one by one.

The adapter (policy_engine/adapter) replaces or reads methods and attributes that neither
library documents; docs/architecture.md lists them with the behaviour tests that break when
one changes. Those tests say *that* something broke; these say *which name* moved, on the
versions installed, so that the CI runs on both ends of the supported range
(.ci/socketio-matrix) point at the cause. Each test is the shape the adapter's code
assumes: a name, a parameter list it calls with, an attribute it reads.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
import socketio
from engineio.async_socket import AsyncSocket

from policy_engine.adapter.cors import CorsPolicy


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.fixture
def sio() -> socketio.AsyncServer:
    return socketio.AsyncServer(
        async_mode="asgi", cors_allowed_origins=["https://a.example"], cors_credentials=False
    )


# The methods attach() replaces on the instance, or calls, with the arguments it passes.
SERVER_METHODS = {
    "_trigger_event": ["event", "namespace", "args"],
    "_handle_event_internal": ["server", "sid", "eio_sid", "data", "namespace", "id"],
    "_handle_eio_disconnect": ["eio_sid", "reason"],
    "_handle_eio_message": ["eio_sid", "data"],
    "_handle_connect": ["eio_sid", "namespace", "data"],
    "_handle_event": ["eio_sid", "namespace", "id", "data"],
    "_handle_ack": ["eio_sid", "namespace", "id", "data"],
    "_handle_disconnect": ["eio_sid", "namespace", "reason"],
    "_send_packet": ["eio_sid", "pkt"],
    "emit": ["event", "data", "to", "room", "skip_sid", "namespace", "callback"],
}


@pytest.mark.parametrize(("name", "expected"), SERVER_METHODS.items())
def test_the_server_methods_the_adapter_replaces_or_calls_keep_their_parameters(
    sio: socketio.AsyncServer, name: str, expected: list[str]
) -> None:
    method = getattr(sio, name)

    assert inspect.iscoroutinefunction(method), name
    assert parameters(method)[: len(expected)] == expected


def test_event_dispatch_finds_handlers_and_says_when_there_is_none(
    sio: socketio.AsyncServer,
) -> None:
    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data

    handler, args = sio._get_event_handler("echo", "/", ("sid1", "x"))
    missing, _ = sio._get_event_handler("nothing", "/", ("sid1",))

    assert handler is echo
    assert tuple(args) == ("sid1", "x")
    assert missing is None
    assert sio.not_handled is not None  # the sentinel _trigger_event returns without handler


def test_engineio_dispatches_to_the_handlers_the_adapter_swaps(sio: socketio.AsyncServer) -> None:
    assert sio.eio.handlers["disconnect"] == sio._handle_eio_disconnect
    assert sio.eio.handlers["message"] == sio._handle_eio_message
    assert parameters(sio.eio.on)[:2] == ["event", "handler"]


def test_the_engineio_server_members_the_adapter_uses(sio: socketio.AsyncServer) -> None:
    eio = sio.eio

    assert isinstance(eio.sockets, dict)
    assert isinstance(eio.max_http_buffer_size, int)
    assert inspect.iscoroutinefunction(eio.send_packet)
    assert parameters(eio.send_packet) == ["sid", "pkt"]
    assert inspect.iscoroutinefunction(eio.send)
    assert parameters(eio.send)[:2] == ["sid", "data"]
    assert eio.reason.SERVER_DISCONNECT
    assert eio.reason.TRANSPORT_CLOSE
    assert sio.reason.CLIENT_DISCONNECT


def test_cors_reads_the_options_engineio_was_created_with(sio: socketio.AsyncServer) -> None:
    cors = CorsPolicy.of(sio.eio)

    assert cors.allowed_origins == ["https://a.example"]
    assert cors.credentials is False


async def test_an_engineio_socket_has_the_queue_and_flags_the_adapter_reads(
    sio: socketio.AsyncServer,
) -> None:
    socket = AsyncSocket(sio.eio, "eio-sid")

    assert isinstance(socket.queue, asyncio.Queue)
    assert socket.closed is False
    assert socket.closing is False
    assert socket.upgraded is False
    assert parameters(socket.close) == ["wait", "abort", "reason"]


async def test_the_manager_maps_sids_both_ways(sio: socketio.AsyncServer) -> None:
    manager = sio.manager
    manager.set_server(sio)
    sid = await manager.connect("eio-sid", "/chat")

    assert manager.sid_from_eio_sid("eio-sid", "/chat") == sid
    assert manager.eio_sid_from_sid(sid, "/chat") == "eio-sid"
    assert manager.is_connected(sid, "/chat")
    assert "/chat" in list(manager.get_namespaces())


def test_packets_decode_and_count_their_binary_attachments(sio: socketio.AsyncServer) -> None:
    pkt = sio.packet_class(encoded_packet='51-/chat,7["upload",{"_placeholder":true,"num":0}]')

    assert pkt.packet_type == socketio.packet.BINARY_EVENT
    assert pkt.namespace == "/chat"
    assert pkt.id == 7
    assert pkt.attachment_count == 1
    assert pkt.add_attachment(b"\x00\x01") is True  # the last one: the packet is whole
    assert pkt.data == ["upload", b"\x00\x01"]
    ack = sio.packet_class(socketio.packet.ACK, namespace="/chat", id=7, data=[{"ok": 1}])
    assert ack.encode() == '3/chat,7[{"ok":1}]'
