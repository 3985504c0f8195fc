"""Packets Engine.IO itself cannot read: counted as protocol errors, the connection kept.

The cases the fuzz suite (``make fuzz``) found, fixed, and held here in the default run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz.exchanges import abuse
from fuzz.harness import LogCapture, fuzz_app, fuzz_policy
from fuzz.strategies import RawPacket
from servers import Served, start_server


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, LogCapture]]:
    with LogCapture() as log:
        server = start_server(fuzz_policy(tmp_path), setup=fuzz_app)
        yield server, log
        server.live.stop()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
@pytest.mark.parametrize(
    "text", ["9garbage", "\u202e", "", "7", "x42[]", "2probe", "0", "6", "bÌÆU", "b1"]
)
def test_a_packet_engineio_cannot_read_leaves_the_connection_served(
    served: tuple[Served, LogCapture], transport: str, text: str
) -> None:
    server, log = served
    conversation = asyncio.run(abuse(server.url, transport, [RawPacket(texts=[text])]))
    assert conversation.connected
    (probe,) = conversation.exchanges
    assert probe.answered, f"the echo after {text!r} on {transport} went unanswered"
    assert not log.tracebacks()
