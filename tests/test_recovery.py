"""Connection-state recovery: a reconnecting client gets exactly what it missed, first."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import socketio
from servers import WAIT, eventually

from policy_engine.state.redis_store import RedisStore

RECOVERY_POLICY = """
version: 1
recovery:
  enabled: true
  max_disconnection: 1m
  buffer_events: {buffer}
  events: [oh_event]
"""


def policy(buffer: int = 100) -> str:
    return RECOVERY_POLICY.format(buffer=buffer)


def conversation_app(live_on_connect: list[dict[str, Any]] | None = None):
    """Clients join the room of their conversation; ``live_on_connect`` is emitted on join."""

    def setup(sio: socketio.AsyncServer) -> None:
        @sio.event
        async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
            room = parse_qs(environ["QUERY_STRING"])["conversation_id"][0]
            await sio.enter_room(sid, room)
            for event in live_on_connect or []:
                await sio.emit("oh_event", event, room=room)

    return setup


def texts(events: list[Any]) -> list[Any]:
    return [event["text"] for event in events]


async def left(served: Any, client: Any) -> None:
    await client.disconnect()
    await eventually(lambda: served.adapter.active_connections() == 0)


async def test_a_reconnecting_client_receives_exactly_the_events_it_missed(serve, clients):
    served = serve(policy(), setup=conversation_app())
    first, inbox = await clients.connect(served.url, query={"conversation_id": "c1"})
    for text in "abc":
        await served.emit("oh_event", {"text": text}, room="c1")
    await inbox.until(lambda: len(inbox.of("oh_event")) == 3)
    seen = inbox.of("oh_event")
    assert [event["id"] for event in seen] == [1, 2, 3]
    await left(served, first)
    for text in "def":
        await served.emit("oh_event", {"text": text}, room="c1")

    _, again = await clients.connect(
        served.url, query={"conversation_id": "c1", "latest_event_id": seen[-1]["id"]}
    )
    await served.emit("oh_event", {"text": "g"}, room="c1")

    await again.until(lambda: len(again.of("oh_event")) == 4)
    assert texts(again.of("oh_event")) == ["d", "e", "f", "g"]
    assert [event["id"] for event in again.of("oh_event")] == [4, 5, 6, 7]
    assert any(event == "recovered" for event, _, _ in served.observer.connections)


async def test_live_events_wait_until_the_replay_is_done_and_are_not_duplicated(serve, clients):
    live: list[dict[str, Any]] = []
    served = serve(policy(), setup=conversation_app(live))
    watcher, watched = await clients.connect(served.url, query={"conversation_id": "c1"})
    for text in "ab":
        await served.emit("oh_event", {"text": text}, room="c1")
    await watched.until(lambda: len(watched.of("oh_event")) == 2)

    # The reconnecting client's own arrival makes the application emit a live event, which
    # the buffer records too: the client must get it once, after the missed ones.
    live.append({"text": "joined"})
    _, inbox = await clients.connect(
        served.url, query={"conversation_id": "c1", "latest_event_id": 0}
    )
    await served.emit("oh_event", {"text": "after"}, room="c1")

    await inbox.until(lambda: "after" in texts(inbox.of("oh_event")))
    assert texts(inbox.of("oh_event")) == ["a", "b", "joined", "after"]
    await watched.until(lambda: len(watched.of("oh_event")) == 4)
    assert texts(watched.of("oh_event")) == ["a", "b", "joined", "after"]
    assert watcher.connected


async def test_events_with_their_own_ids_are_replayed_by_those_ids(serve, clients):
    served = serve(policy(), setup=conversation_app())
    first, inbox = await clients.connect(served.url, query={"conversation_id": "c9"})
    for number in (100, 101):
        await served.emit("oh_event", {"id": number, "text": str(number)}, room="c9")
    await inbox.until(lambda: len(inbox.of("oh_event")) == 2)
    await left(served, first)
    for number in (101, 102, 103):  # 101 again: an application replaying its own history
        await served.emit("oh_event", {"id": number, "text": str(number)}, room="c9")

    _, again = await clients.connect(
        served.url, query={"conversation_id": "c9"}, auth={"latest_event_id": 101}
    )
    await served.emit("oh_event", {"id": 104, "text": "104"}, room="c9")

    await again.until(lambda: len(again.of("oh_event")) == 3)
    assert [event["id"] for event in again.of("oh_event")] == [102, 103, 104]


async def test_events_sent_to_one_connection_are_buffered_in_its_conversation(serve, clients):
    served = serve(policy(), setup=conversation_app())
    first, inbox = await clients.connect(served.url, query={"conversation_id": "c3"})
    await served.emit("oh_event", {"text": "direct"}, to=first.get_sid())
    await inbox.until(lambda: len(inbox.of("oh_event")) == 1)
    await left(served, first)
    await served.emit("oh_event", {"text": "missed"}, room="c3")

    _, again = await clients.connect(
        served.url, query={"conversation_id": "c3", "latest_event_id": 1}
    )

    await again.until(lambda: len(again.of("oh_event")) == 1)
    assert again.of("oh_event") == [{"text": "missed", "id": 2}]


async def test_a_client_that_missed_more_than_the_buffer_is_told_to_reload(serve, clients):
    served = serve(policy(buffer=3), setup=conversation_app())
    first, inbox = await clients.connect(served.url, query={"conversation_id": "c1"})
    await served.emit("oh_event", {"text": "a"}, room="c1")
    await inbox.until(lambda: len(inbox.of("oh_event")) == 1)
    await left(served, first)
    for text in "bcdef":
        await served.emit("oh_event", {"text": text}, room="c1")

    _, again = await clients.connect(
        served.url, query={"conversation_id": "c1", "latest_event_id": 1}
    )

    await again.until(lambda: bool(again.of("policy_error")))
    (payload,) = again.of("policy_error")
    assert payload["code"] == "RECOVERY_UNAVAILABLE"
    assert payload["retryable"] is False
    assert again.of("oh_event") == []


async def test_an_event_id_this_server_never_sent_cannot_be_recovered(serve, clients):
    served = serve(policy(), setup=conversation_app())

    _, inbox = await clients.connect(
        served.url, query={"conversation_id": "c1", "latest_event_id": 41}
    )

    await inbox.until(lambda: bool(inbox.of("policy_error")))
    assert inbox.of("policy_error")[0]["code"] == "RECOVERY_UNAVAILABLE"


async def test_a_fresh_client_gets_no_replay_and_no_error(serve, clients):
    served = serve(policy(), setup=conversation_app())
    first, inbox = await clients.connect(served.url, query={"conversation_id": "c1"})
    await served.emit("oh_event", {"text": "a"}, room="c1")
    await inbox.until(lambda: len(inbox.of("oh_event")) == 1)

    _, fresh = await clients.connect(
        served.url, query={"conversation_id": "c1", "latest_event_id": -1}
    )
    await served.emit("oh_event", {"text": "b"}, room="c1")

    await fresh.until(lambda: len(fresh.of("oh_event")) == 1, timeout=WAIT)
    assert texts(fresh.of("oh_event")) == ["b"]
    assert fresh.of("policy_error") == []
    assert first.connected


BYTES_POLICY = """
version: 1
recovery:
  enabled: true
  max_disconnection: 1m
  buffer_events: 500
  max_buffer_bytes: 10KB
  max_total_bytes: 25KB
  events: [oh_event]
"""


async def test_buffers_are_bounded_in_bytes_and_a_client_that_missed_an_evicted_event_reloads(
    serve, clients
):
    served = serve(BYTES_POLICY, setup=conversation_app())
    first, inbox = await clients.connect(served.url, query={"conversation_id": "c1"})
    await served.emit("oh_event", {"text": "a"}, room="c1")
    await inbox.until(lambda: len(inbox.of("oh_event")) == 1)
    await left(served, first)
    big = "x" * 4_000
    for _ in range(3):  # 12 KB into a 10 KB buffer: the oldest go first
        await served.emit("oh_event", {"text": big}, room="c1")

    _, again = await clients.connect(
        served.url, query={"conversation_id": "c1", "latest_event_id": 1}
    )

    await again.until(lambda: bool(again.of("policy_error")))
    assert again.of("policy_error")[0]["code"] == "RECOVERY_UNAVAILABLE"
    assert again.of("oh_event") == []
    # Conversations together stay within the total, however little each one holds.
    for room in ("c2", "c3", "c4"):
        await clients.connect(served.url, query={"conversation_id": room})
        for _ in range(2):
            await served.emit("oh_event", {"text": big}, room=room)
    streams, _, buffered = served.engine.local.replay_counts()
    assert streams >= 3
    assert 16_000 < buffered <= 25_000


async def test_ids_of_conversations_with_no_client_here_are_forgotten_on_a_shared_store(
    serve, own_redis_server
):
    store = RedisStore(own_redis_server.url, prefix="elsewhere")
    served = serve(policy().replace("1m", "1s"), setup=conversation_app(), store=store)
    try:
        for n in range(50):  # conversations whose clients are on other processes, or nowhere
            await served.emit("oh_event", {"text": "x"}, room=f"named-by-a-client-{n}")
        index = served.adapter.recovery.index
        assert index.last_payload_id("named-by-a-client-0") == 1

        await eventually(lambda: index.last_payload_id("named-by-a-client-49") is None)
    finally:
        await served.run(store.close())
