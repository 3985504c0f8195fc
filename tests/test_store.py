"""The memory store's replay buffers: exact replay, bounded per stream and over time."""

from __future__ import annotations

from policy_engine.store import MemoryStore


async def test_a_replay_returns_exactly_the_missed_events_in_order() -> None:
    store = MemoryStore()
    ids = [await store.append_replay("c1", "oh_event", {"n": n}, 10, 100.0 + n) for n in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    missed = await store.replay_since("c1", 2, 60.0, 106.0)
    assert missed is not None
    assert [(e.event_id, e.data) for e in missed] == [(3, {"n": 2}), (4, {"n": 3}), (5, {"n": 4})]
    assert await store.replay_since("c1", 5, 60.0, 106.0) == []


async def test_more_missed_than_buffered_cannot_be_replayed() -> None:
    store = MemoryStore()
    for n in range(5):
        await store.append_replay("c1", "oh_event", n, 3, 100.0)
    assert await store.replay_since("c1", 1, 60.0, 100.0) is None
    replayed = await store.replay_since("c1", 2, 60.0, 100.0)
    assert replayed is not None
    assert [e.event_id for e in replayed] == [3, 4, 5]


async def test_idle_streams_are_dropped_but_their_ids_keep_counting() -> None:
    store = MemoryStore()
    for n in range(3):
        await store.append_replay("quiet", "oh_event", n, 500, 100.0, retain=120.0)
    still_there = await store.replay_since("quiet", 2, 1_000.0, 230.0)
    assert still_there is not None
    assert [e.event_id for e in still_there] == [3]
    await store.append_replay("busy", "oh_event", "x", 500, 230.0, retain=120.0)
    # "quiet" saw nothing for longer than the 120 s anyone could recover within: dropped
    assert await store.replay_since("quiet", 2, 1_000.0, 230.0) is None
    assert await store.replay_since("quiet", 3, 120.0, 230.0) == []  # had seen everything
    assert await store.replay_since("quiet", 1, 120.0, 230.0) is None  # its events are gone
    assert await store.append_replay("quiet", "oh_event", "again", 500, 300.0, retain=120.0) == 4
    replayed = await store.replay_since("quiet", 3, 120.0, 300.0)
    assert replayed is not None
    assert [e.event_id for e in replayed] == [4]


async def test_streams_with_recent_events_are_kept() -> None:
    store = MemoryStore()
    await store.append_replay("a", "oh_event", 1, 500, 100.0, retain=120.0)
    await store.append_replay("b", "oh_event", 1, 500, 150.0, retain=120.0)
    await store.append_replay("a", "oh_event", 2, 500, 210.0, retain=120.0)
    for stream in ("a", "b"):
        replayed = await store.replay_since(stream, 0, 1_000.0, 210.0)
        assert replayed is not None
        assert replayed[0].data == 1
