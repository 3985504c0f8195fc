"""The bounded outbound buffer: its algorithm, its pump, and a real slow consumer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from servers import WAIT, eventually

from policy_engine.adapter import outgoing
from policy_engine.adapter.outbox import CRITICAL, Outbox, PriorityBuffer
from policy_engine.language.model import OutboundSpec, OverflowAction, Priority

LOW, NORMAL, HIGH = Priority.LOW.rank, Priority.NORMAL.rank, Priority.HIGH.rank

# -- PriorityBuffer ----------------------------------------------------------------------------


def test_entries_leave_in_arrival_order_whatever_their_priority():
    buffer: PriorityBuffer[str] = PriorityBuffer(10)
    for item, rank in [("a", LOW), ("b", CRITICAL), ("c", NORMAL), ("d", LOW)]:
        assert buffer.push(item, rank) is None

    assert [buffer.pop() for _ in range(len(buffer))] == ["a", "b", "c", "d"]
    assert not buffer


def test_a_full_buffer_drops_the_oldest_of_the_lowest_priority_first():
    buffer: PriorityBuffer[str] = PriorityBuffer(3)
    buffer.push("low-1", LOW)
    buffer.push("high", HIGH)
    buffer.push("low-2", LOW)

    assert buffer.push("normal", NORMAL) == "low-1"
    assert buffer.push("normal-2", NORMAL) == "low-2"
    assert list(buffer) == ["high", "normal", "normal-2"]


def test_a_newcomer_below_everything_queued_is_the_one_dropped():
    buffer: PriorityBuffer[str] = PriorityBuffer(2)
    buffer.push("a", HIGH)
    buffer.push("b", HIGH)

    assert buffer.push("telemetry", LOW) == "telemetry"
    assert list(buffer) == ["a", "b"]


def test_discard_removes_only_the_selected_entries():
    buffer: PriorityBuffer[int] = PriorityBuffer(10)
    for n in range(6):
        buffer.push(n, n % 3)

    assert buffer.discard(lambda n: n % 2 == 0) == 3
    assert list(buffer) == [1, 3, 5]
    assert len(buffer) == 3


def test_popping_an_empty_buffer_raises():
    with pytest.raises(IndexError):
        PriorityBuffer[int](1).pop()


@given(
    capacity=st.integers(1, 8),
    pushes=st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=60),
)
def test_the_buffer_stays_bounded_and_drops_nothing_ranked_above_a_survivor(capacity, pushes):
    buffer: PriorityBuffer[tuple[int, int]] = PriorityBuffer(capacity)
    popped: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    for serial, (rank, pop_first) in enumerate(pushes):
        if pop_first and buffer:
            popped.append(buffer.pop())
        lost = buffer.push((serial, rank), rank)
        if lost is not None:
            dropped.append(lost)
            # Whatever was dropped ranked no higher than anything still waiting.
            assert all(lost[1] <= kept[1] for kept in buffer)
        assert len(buffer) <= capacity
    survivors = popped + list(buffer)
    assert [s for s, _ in survivors] == sorted(s for s, _ in survivors)
    assert len(survivors) + len(dropped) == len(pushes)


# -- Outbox ------------------------------------------------------------------------------------


class Transport:
    """A stand-in for Engine.IO: a queue, and a writer that takes everything when let go."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.written: list[Any] = []
        self.flowing = asyncio.Event()
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def deliver(self, item: Any) -> None:
        await self.queue.put(item)

    async def _write(self) -> None:
        while True:
            await self.flowing.wait()
            item = await self.queue.get()
            self.queue.task_done()
            self.written.append(item)

    def close(self) -> None:
        self._writer.cancel()


SPEC = OutboundSpec(max_queue=4, on_overflow=OverflowAction.DROP_LOWEST, disconnect_after_drops=3)


async def test_packets_go_straight_through_while_the_client_keeps_up():
    transport = Transport()
    outbox: Outbox[str] = Outbox(transport.deliver, transport.queue, 4, high_water=2)

    assert outbox.direct()
    await transport.deliver("a")
    await transport.deliver("b")
    assert not outbox.direct()
    transport.flowing.set()
    await eventually(lambda: transport.written == ["a", "b"])
    assert outbox.direct()
    transport.close()


async def test_a_backlog_is_bounded_then_pumped_in_order_when_the_client_catches_up():
    transport = Transport()
    outbox: Outbox[str] = Outbox(transport.deliver, transport.queue, 4, high_water=1)
    await transport.deliver("first")

    results = [outbox.enqueue(f"n{n}", NORMAL, SPEC) for n in range(6)]

    assert [dropped for dropped, _ in results] == [None] * 4 + ["n0", "n1"]
    assert [disconnect for _, disconnect in results] == [False] * 6
    assert outbox.drops == 2
    transport.flowing.set()
    await eventually(lambda: transport.written == ["first", "n2", "n3", "n4", "n5"])
    await eventually(lambda: not outbox.pumping)
    transport.close()


async def test_the_policy_disconnects_after_enough_drops_or_at_once():
    transport = Transport()
    outbox: Outbox[str] = Outbox(transport.deliver, transport.queue, 1, high_water=0)
    outbox.hold()

    patient = OutboundSpec(max_queue=1, disconnect_after_drops=3)
    verdicts = [outbox.enqueue(str(n), NORMAL, patient)[1] for n in range(5)]
    assert verdicts == [False, False, False, True, True]

    strict = OutboundSpec(max_queue=1, on_overflow=OverflowAction.DISCONNECT)
    fresh: Outbox[str] = Outbox(transport.deliver, transport.queue, 1, high_water=0)
    fresh.hold()
    assert [fresh.enqueue(str(n), NORMAL, strict)[1] for n in range(2)] == [False, True]
    transport.close()


async def test_held_packets_wait_for_release_and_unwanted_ones_are_removed():
    transport = Transport()
    transport.flowing.set()
    outbox: Outbox[int] = Outbox(transport.deliver, transport.queue, 10)
    outbox.hold()
    assert not outbox.direct()

    for n in range(5):
        outbox.enqueue(n, NORMAL, OutboundSpec(max_queue=10))
    await asyncio.sleep(0)
    assert transport.written == []

    outbox.release(lambda n: n < 2)
    await eventually(lambda: transport.written == [2, 3, 4])
    transport.close()


async def test_closing_forgets_the_backlog_and_stops_the_pump():
    transport = Transport()
    outbox: Outbox[int] = Outbox(transport.deliver, transport.queue, 10, high_water=1)
    await transport.deliver(0)
    outbox.enqueue(1, NORMAL, OutboundSpec(max_queue=10))
    assert outbox.pumping

    outbox.close()
    await asyncio.sleep(0)

    assert not outbox.pumping
    assert len(outbox.buffer) == 0
    transport.close()


# -- a real slow consumer ----------------------------------------------------------------------

SLOW_POLICY = """
version: 1
connections:
  outbound: {max_queue: 50, on_overflow: drop_lowest, disconnect_after_drops: 20}
"""

PRIORITY_POLICY = """
version: 1
connections:
  outbound: {max_queue: 40, on_overflow: drop_lowest, disconnect_after_drops: 1000000}
events:
  flood: {priority: low}
  news: {priority: critical}
"""

CHUNK = "x" * 8192
FLOOD = 3000  # 24 MB: far more than the loopback socket buffers hold


def stop_reading(client: Any) -> asyncio.Event:
    """Make a client stop reading its socket until the returned event is set.

    Its Engine.IO read loop waits before handling each packet, so aiohttp stops reading
    the socket once its own small buffer is full, and TCP pushes back on the server.
    """
    resume = asyncio.Event()
    receive = client.eio._receive_packet

    async def blocked(pkt: Any) -> None:
        await resume.wait()
        await receive(pkt)

    client.eio._receive_packet = blocked
    return resume


async def flood(sio: Any, sid: str, *, news_every: int = 0) -> None:
    for n in range(FLOOD):
        await sio.emit("flood", CHUNK, to=sid)
        if news_every and n % news_every == 0:
            await sio.emit("news", {"n": n}, to=sid)


def transport_queue(served: Any, sid: str) -> asyncio.Queue[Any]:
    eio_sid = served.sio.manager.eio_sid_from_sid(sid, "/")
    queue: asyncio.Queue[Any] = served.sio.eio.sockets[eio_sid].queue
    return queue


async def test_a_client_that_stops_reading_is_bounded_then_disconnected(serve, clients):
    served = serve(SLOW_POLICY)
    client, _ = await clients.connect(served.url, listen=())
    sid = client.get_sid()
    queue = transport_queue(served, sid)
    resume = stop_reading(client)

    await served.run(flood(served.sio, sid))

    assert queue.qsize() <= 64 + 1  # the high-water mark, plus the disconnect packet
    await eventually(lambda: served.adapter.active_connections() == 0)
    drops = [d for d in served.observer.drops if d[0] == sid]
    assert len(drops) >= 20
    assert drops[0] == (sid, "flood", "overflow")
    assert ("closed", sid, "slow_consumer") in served.observer.connections
    resume.set()


async def test_a_slow_consumer_loses_low_priority_events_before_critical_ones(serve, clients):
    served = serve(PRIORITY_POLICY)
    client, inbox = await clients.connect(served.url)
    sid = client.get_sid()
    resume = stop_reading(client)

    await served.run(flood(served.sio, sid, news_every=100))
    sent_news = len(range(0, FLOOD, 100))
    resume.set()

    await inbox.until(lambda: len(inbox.of("news")) == sent_news, timeout=WAIT)
    assert [item["n"] for item in inbox.of("news")] == list(range(0, FLOOD, 100))
    assert 0 < len(inbox.of("flood")) < FLOOD
    assert client.connected


async def relayed_flood(sio: Any, sid: str) -> None:
    """The flood as a message-queue manager delivers another process's emits: through the
    client manager, not ``sio.emit``."""
    for n in range(FLOOD):
        await sio.manager.emit("flood", CHUNK, "/", room=sid)
        if n % 100 == 0:
            await sio.manager.emit("news", {"n": n}, "/", room=sid)


async def test_relayed_events_keep_their_priority_when_the_client_is_behind(serve, clients):
    served = serve(PRIORITY_POLICY)
    client, inbox = await clients.connect(served.url)
    sid = client.get_sid()
    resume = stop_reading(client)

    await served.run(relayed_flood(served.sio, sid))
    sent_news = len(range(0, FLOOD, 100))
    resume.set()

    await inbox.until(lambda: len(inbox.of("news")) == sent_news, timeout=WAIT)
    assert [item["n"] for item in inbox.of("news")] == list(range(0, FLOOD, 100))
    assert 0 < len(inbox.of("flood")) < FLOOD


# -- bounds in bytes ---------------------------------------------------------------------------


def test_the_buffer_is_bounded_in_bytes_dropping_the_lowest_priority_first():
    buffer: PriorityBuffer[str] = PriorityBuffer(100, max_bytes=10)
    buffer.push("low", LOW, 4)
    buffer.push("high", HIGH, 4)

    dropped = buffer.push("normal", NORMAL, 4)

    assert dropped == "low"
    assert list(buffer) == ["high", "normal"]
    assert buffer.bytes == 8
    assert buffer.pop() == "high"
    assert buffer.bytes == 4


def test_one_large_entry_may_evict_several_and_each_counts_as_a_drop():
    transport_queue: asyncio.Queue[Any] = asyncio.Queue()
    outbox: Outbox[str] = Outbox(_never, transport_queue, 100, high_water=0, max_bytes=10)
    outbox.hold()
    spec = OutboundSpec(max_queue=100, max_bytes=10, disconnect_after_drops=1000)
    for n in range(5):
        outbox.enqueue(f"small{n}", LOW, spec, 2)

    dropped, _ = outbox.enqueue("large", NORMAL, spec, 9)

    assert dropped == "small4"
    assert outbox.drops == 5
    assert list(outbox.buffer) == ["large"]


async def _never(item: Any) -> None:
    raise AssertionError("nothing is delivered while held")


async def test_packets_go_direct_only_while_the_transport_holds_fewer_bytes_than_the_bound():
    transport = Transport()
    outbox: Outbox[str] = Outbox(transport.deliver, transport.queue, 4, max_bytes=100)

    assert outbox.direct(60)
    await transport.deliver("a")
    assert not outbox.direct(60)  # 120 bytes would be queued
    assert outbox.direct(30)
    transport.flowing.set()
    await eventually(lambda: transport.queue.qsize() == 0)
    assert outbox.direct(60)
    transport.close()


async def test_a_replay_waits_for_room_and_gives_up_on_a_client_that_does_not_read():
    transport = Transport()
    outbox: Outbox[str] = Outbox(transport.deliver, transport.queue, 4, max_bytes=100)
    assert await outbox.room(90, 0.05)
    await transport.deliver("replayed")

    stalled = await outbox.room(90, 0.05)
    transport.flowing.set()
    resumed = await outbox.room(90, WAIT)

    assert (stalled, resumed) == (False, True)
    transport.close()


BYTES_POLICY = """
version: 1
connections:
  outbound: {max_queue: 100000, max_bytes: 200KB, disconnect_after_drops: 1000000}
events:
  flood: {priority: low}
  news: {priority: critical}
"""


async def test_relayed_events_to_a_stalled_client_are_bounded_in_bytes(serve, clients):
    served = serve(BYTES_POLICY)
    client, inbox = await clients.connect(served.url)
    sid = client.get_sid()
    queue = transport_queue(served, sid)
    resume = stop_reading(client)

    await served.run(relayed_flood(served.sio, sid))
    link = served.adapter.outgoing.links[served.sio.manager.eio_sid_from_sid(sid, "/")]
    buffered, queued = link.outbox.buffer.bytes, sum(len(p.data) for p in list(queue._queue))
    resume.set()

    assert buffered <= 200_000
    assert queued <= 200_000 + len(CHUNK) + 100
    assert [d for d in served.observer.drops if d[0] == sid]
    await inbox.until(lambda: len(inbox.of("news")) == len(range(0, FLOOD, 100)), timeout=WAIT)
    assert client.connected


async def test_a_replay_to_a_client_that_does_not_read_is_bounded_then_disconnected(
    serve, clients, monkeypatch
):
    monkeypatch.setattr(outgoing, "REPLAY_PATIENCE", 0.3)
    served = serve(BYTES_POLICY)
    client, _ = await clients.connect(served.url, listen=())
    sid = client.get_sid()
    queue = transport_queue(served, sid)
    resume = stop_reading(client)
    largest_queued = 0

    async def replay_flood() -> None:
        nonlocal largest_queued
        for n in range(FLOOD):
            await served.adapter.outgoing.replay("oh_event", {"n": n, "x": CHUNK}, sid, "/", "c")
            largest_queued = max(largest_queued, sum(len(p.data) for p in list(queue._queue)))

    await served.run(replay_flood())

    assert largest_queued <= 200_000 + 2 * len(CHUNK)
    await eventually(lambda: served.adapter.active_connections() == 0)
    assert ("closed", sid, "slow_consumer") in served.observer.connections
    resume.set()
