"""Protocol abuse through a real server: sizes measured where a message is assembled,
malformed packets counted and answered by the policy, never a wedged connection."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import socketio
from protocol_clients import RawPolling, RawWebSocket, ack_payload, binary
from servers import WAIT, eventually

from policy_engine.adapter.inbound import nesting_depth

_addresses = itertools.count(1)


def fresh_ip() -> dict[str, str]:
    return {"X-Forwarded-For": f"192.0.2.{next(_addresses) % 250 + 1}"}


def app(sio: socketio.AsyncServer) -> None:
    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data

    @sio.event
    async def telemetry(sid: str, data: Any) -> str:
        return "stored"


PROTOCOL_POLICY = """
version: 1
connections:
  protocol: {max_errors: 3, max_depth: 32, answer_unknown_events: true}
events:
  big: {max_bytes: 1MB}
  "*": {max_bytes: 64KB}
"""


@pytest.fixture
async def raw_ws():
    opened: list[Any] = []

    async def open_(url: str, **kwargs: Any) -> RawWebSocket:
        raw = await RawWebSocket.open(url, headers=fresh_ip(), **kwargs)
        opened.append(raw)
        return raw

    yield open_
    for raw in opened:
        await raw.close()


@asynccontextmanager
async def joined_polling(served: Any) -> AsyncIterator[RawPolling]:
    """A raw long-polling client joined to the default namespace, closed afterwards."""
    raw = await RawPolling.open(served.url, headers=fresh_ip(), query="")
    try:
        await raw.post("40")
        await raw.until("40")
        yield raw
    finally:
        await raw.close()


async def test_a_binary_event_split_over_polling_requests_is_measured_whole(serve):
    served = serve(setup=app)
    raw = await RawPolling.open(served.url, headers=fresh_ip())
    try:
        await raw.post("40")
        await raw.until("40")
        # Neither part is over telemetry's 16KB; the event they make together is.
        header = '451-7["telemetry",{"text":"' + "x" * 10_000 + '","blob":'
        header += '{"_placeholder":true,"num":0}}]'
        assert await raw.post(header) == 200
        assert await raw.post(binary(b"\x00" * 10_000)) == 200
        answer = ack_payload(await raw.until("437"), "437")
    finally:
        await raw.close()

    assert answer["code"] == "PAYLOAD_TOO_LARGE"
    assert answer["policy"] == "events/telemetry"


async def test_max_bytes_of_1mb_is_reachable_and_a_larger_frame_gets_the_policy_answer(
    serve, raw_ws
):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()

    await raw.send("21" + json.dumps(["big", "x" * 1_200_000]))
    over = ack_payload(await raw.until("431"), "431")
    await raw.send("22" + json.dumps(["echo", "still here"]))
    after = await raw.until("432")

    assert over["code"] == "PAYLOAD_TOO_LARGE"
    assert over["policy"] == "events/big"
    assert after == '432["still here"]'


async def test_a_frame_over_engineio_limit_gets_the_policy_answer_not_a_closed_transport(
    serve, raw_ws
):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()
    over_engineio = served.sio.eio.max_http_buffer_size + 1000

    await raw.send("21" + json.dumps(["big", "x" * over_engineio]))
    answer = ack_payload(await raw.until("431"), "431")
    await raw.send('22["echo","still here"]')
    after = await raw.until("432")

    assert answer["code"] == "PAYLOAD_TOO_LARGE"
    assert answer["policy"] == "events/big"
    assert after == '432["still here"]'


async def test_a_polling_request_over_engineio_limit_gets_the_policy_answer(serve):
    served = serve(PROTOCOL_POLICY, setup=app)
    over_engineio = served.sio.eio.max_http_buffer_size + 1000
    async with joined_polling(served) as raw:
        status = await raw.post("421" + json.dumps(["big", "x" * over_engineio]))
        answer = ack_payload(await raw.until("431"), "431")
        await raw.post('422["echo","still here"]')
        after = await raw.until("432")

    assert status == 200
    assert answer["code"] == "PAYLOAD_TOO_LARGE"
    assert answer["policy"] == "events/big"
    assert after == '432["still here"]'


async def test_an_oversized_text_event_is_refused_before_it_is_decoded(serve, raw_ws):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()

    # Not JSON after the name: decoding it would fail, so the answer proves it was not.
    await raw.send('23["echo","' + "y" * 70_000 + '", nonsense')
    answer = ack_payload(await raw.until("433"), "433")

    assert answer["code"] == "PAYLOAD_TOO_LARGE"
    assert served.adapter.inbound.faults(next(iter(served.sio.eio.sockets))) == 0


@pytest.mark.parametrize(
    ("broken", "then_binary"),
    [
        ("6[]", False),  # a binary ack that announces no attachments
        ('51-["echo",{"_placeholder":true,"num":5}]', True),  # names a missing attachment
        ('51-["echo",{"_placeholder":true,"num":0}]', False),  # its attachment never comes
    ],
)
async def test_a_broken_binary_packet_does_not_wedge_the_connection(
    serve, raw_ws, broken, then_binary
):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()

    await raw.send(broken)
    if then_binary:
        await raw.send_binary(b"\x01\x02")
    await raw.send('21["echo","alive"]')
    answer = await raw.until("431")

    assert answer == '431["alive"]'


async def test_a_stream_of_malformed_packets_closes_the_connection_with_a_payload(
    serve, raw_ws, caplog
):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()
    caplog.set_level(logging.INFO)

    for _ in range(4):
        await raw.send("2[not json")
    notice = await raw.until('42["policy_error"')
    closed = await raw.until("1")  # Engine.IO's close packet

    payload = json.loads(notice[2:])[1]
    assert payload["code"] == "INVALID_REQUEST"
    assert payload["policy"] == "connections/protocol"
    assert payload["retryable"] is False
    assert closed == "1" or closed.startswith("<")
    if closed == "1":  # the server ends the WebSocket itself, whatever the client does
        assert (await raw.receive()).startswith("<")
    await eventually(lambda: served.adapter.active_connections() == 0)
    assert not [r for r in caplog.records if r.exc_info], "a traceback for client input"


async def test_malformed_packets_are_logged_once_per_kind_and_interval(serve, raw_ws):
    served = serve(PROTOCOL_POLICY.replace("max_errors: 3", "max_errors: 0"), setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()
    lines: list[dict[str, Any]] = []
    served.adapter.inbound.log._log = _Recorder(lines)

    for _ in range(50):
        await raw.send("2[not json")
    await raw.send('21["echo","alive"]')
    answer = await raw.until("431")

    assert answer == '431["alive"]'
    assert [line["kind"] for line in lines] == ["malformed"]
    assert lines[0]["count"] == 1


class _Recorder:
    def __init__(self, lines: list[dict[str, Any]]) -> None:
        self.lines = lines

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


async def test_deeply_nested_arguments_are_refused_as_invalid_and_not_retryable(serve, raw_ws):
    served = serve(setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()

    await raw.send('21["echo",{"args":' + "[" * 900 + "1" + "]" * 900 + "}]")
    answer = ack_payload(await raw.until("431"), "431")
    await raw.send('22["echo","fine"]')
    after = await raw.until("432")

    assert answer["code"] == "INVALID_REQUEST"
    assert answer["retryable"] is False
    assert after == '432["fine"]'


async def test_unknown_events_and_namespaces_are_answered_when_the_policy_says_so(
    serve, clients, raw_ws
):
    served = serve(PROTOCOL_POLICY, setup=app)
    client, _ = await clients.connect(served.url, headers=fresh_ip())
    raw = await raw_ws(served.url)
    await raw.connect()

    unknown = await client.call("no_such_event", 1, timeout=WAIT)
    await raw.send('2/elsewhere,9["echo",1]')
    elsewhere = ack_payload(await raw.until("43/elsewhere,9"), "43/elsewhere,9")

    assert unknown["code"] == "UNKNOWN_EVENT"
    assert elsewhere["code"] == "UNKNOWN_EVENT"


async def test_unknown_events_stay_unanswered_by_default(serve, clients):
    served = serve(setup=app)
    client, _ = await clients.connect(
        served.url, query={"conversation_id": "c1"}, headers=fresh_ip()
    )

    with pytest.raises(socketio.exceptions.TimeoutError):
        await client.call("no_such_event", 1, timeout=0.5)


ONE_PER_IP = """
version: 1
connections: {max_per_ip: 1}
"""


async def test_an_event_named_disconnect_does_not_detach_the_policy_under_the_admin_ui(
    serve, clients, admin_ui
):
    served = serve(ONE_PER_IP, setup=app, setup_after=admin_ui)
    address = fresh_ip()
    client, _ = await clients.connect(served.url, headers=address)

    answer = await client.call("disconnect", "bye", timeout=WAIT)
    refusal = await clients.refused(served.url, headers=address)

    assert answer["code"] == "INVALID_REQUEST"
    assert refusal["data"]["code"] == "TOO_MANY_CONNECTIONS"
    assert served.adapter.active_connections() == 1


async def test_brackets_inside_strings_are_not_nesting(serve, raw_ws):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()
    text = '[{"' * 40 + '\\"'

    await raw.send("21" + json.dumps(["echo", text]))
    answer = await raw.until("431")

    assert json.loads(answer[3:]) == [text]


@pytest.mark.parametrize(
    ("text", "depth"),
    [('["a"]', 1), ('["a",[[1]],{"b":[2]}]', 3), ('["[[[[", "\\"[["]', 1), ("[]", 1), ("", 0)],
)
def test_nesting_depth_counts_structure_only(text, depth):
    assert nesting_depth(text, 0) == depth


MALFORMED = [
    "42[not json",  # unreadable JSON
    "4246[]",  # not a packet type python-socketio knows
    "46[]",  # a binary ack without attachments
    '42{"not":"a list"}',  # an event that is not an array
    "42[]",  # an event without a name
    "49",  # no such packet type
    '451-["echo",{"_placeholder":true,"num":3}]',  # a placeholder naming no attachment
    "bAAEC",  # ... and its attachment
    "b////",  # an attachment nothing waits for
]


async def test_malformed_packets_over_long_polling_are_counted_and_the_connection_recovers(
    serve, caplog
):
    served = serve(PROTOCOL_POLICY.replace("max_errors: 3", "max_errors: 100"), setup=app)
    raw = await RawPolling.open(served.url, headers=fresh_ip(), query="")
    caplog.set_level(logging.INFO)
    try:
        await raw.post("40")
        await raw.until("40")
        for packet in MALFORMED:
            assert await raw.post(packet) == 200
        await raw.post('421["echo","alive"]')
        answer = await raw.until("431")
    finally:
        await raw.close()

    assert answer == '431["alive"]'
    (eio_sid,) = served.sio.eio.sockets
    assert served.adapter.inbound.faults(eio_sid) >= len(MALFORMED) - 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback for client input"


@pytest.mark.parametrize(
    ("unreadable", "attachments"),
    [
        ('27["echo",' + "9" * 101 + "]", 0),  # Engine.IO's JSON refuses 101-digit integers
        ('27["echo",[1,2}]', 0),
        ('51-7["echo",{"_placeholder":true,"num":' + "9" * 101 + "}]", 1),
    ],
)
async def test_an_event_that_cannot_be_decoded_gets_its_ack_and_the_connection_goes_on(
    serve, raw_ws, unreadable, attachments
):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()

    await raw.send(unreadable)
    for _ in range(attachments):
        await raw.send_binary(b"\x01\x02")
    answer = ack_payload(await raw.until("437"), "437")
    await raw.send('21["echo","alive"]')
    after = await raw.until("431")

    assert answer["code"] == "INVALID_REQUEST"
    assert answer["retryable"] is False
    assert after == '431["alive"]'
    assert [served.adapter.inbound.faults(sid) for sid in served.sio.eio.sockets] == [1]


async def test_an_attachment_over_engineio_limit_gets_the_policy_answer_over_websocket(
    serve, raw_ws
):
    served = serve(PROTOCOL_POLICY, setup=app)
    raw = await raw_ws(served.url)
    await raw.connect()
    over_engineio = served.sio.eio.max_http_buffer_size + 1000

    await raw.send('51-7["echo",{"_placeholder":true,"num":0}]')
    await raw.send_binary(b"\x00" * over_engineio)
    answer = ack_payload(await raw.until("437"), "437")
    await raw.send('21["echo","still here"]')
    after = await raw.until("431")

    assert answer["code"] == "PAYLOAD_TOO_LARGE"
    assert answer["policy"] == "events/*"
    assert after == '431["still here"]'


async def test_an_attachment_over_engineio_limit_gets_the_policy_answer_over_polling(serve):
    served = serve(PROTOCOL_POLICY, setup=app)
    over_engineio = served.sio.eio.max_http_buffer_size + 1000
    async with joined_polling(served) as raw:
        await raw.post('451-7["echo",{"_placeholder":true,"num":0}]')
        status = await raw.post(binary(b"\x00" * over_engineio))
        answer = ack_payload(await raw.until("437"), "437")
        await raw.post('421["echo","still here"]')
        after = await raw.until("431")

    assert status == 200
    assert answer["code"] == "PAYLOAD_TOO_LARGE"
    assert after == '431["still here"]'


async def test_every_event_of_a_polling_batch_over_engineio_limit_is_answered(serve):
    served = serve(PROTOCOL_POLICY, setup=app)
    over_engineio = served.sio.eio.max_http_buffer_size + 1000
    async with joined_polling(served) as raw:
        status = await raw.post(
            '421["echo","before"]',
            "422" + json.dumps(["big", "x" * over_engineio]),
            '423["echo","after"]',
        )
        received: list[str] = []
        async with asyncio.timeout(WAIT):
            while len([p for p in received if p[:3] in ("431", "432", "433")]) < 3:
                received += await raw.poll()
        answers = sorted(p for p in received if p[:3] in ("431", "432", "433"))

    assert status == 200
    assert answers[0] == '431["before"]'
    assert ack_payload(answers[1], "432")["code"] == "PAYLOAD_TOO_LARGE"
    assert answers[2] == '433["after"]'


async def test_closing_a_polling_client_for_protocol_errors_never_holds_its_request(serve):
    """The request that crosses max_errors is answered at once, though the client's next
    GET (refused: the session is closed) can never read the close packet."""
    served = serve(PROTOCOL_POLICY, setup=app)  # max_errors: 3
    statuses: list[int] = []
    received: list[str] = []
    async with joined_polling(served) as raw:
        for ack in range(1, 5):
            async with asyncio.timeout(WAIT):
                statuses.append(await raw.post(f'42{ack}["connect"]'))
                while not any(p.startswith(f"43{ack}") for p in received):
                    received += await raw.poll()

    assert statuses == [200, 200, 200, 200]
    (notice,) = [p for p in received if p.startswith('42["policy_error"')]
    assert json.loads(notice[2:])[1]["code"] == "INVALID_REQUEST"
    await eventually(lambda: served.adapter.active_connections() == 0)
    await eventually(lambda: all(s.closed for s in served.sio.eio.sockets.values()))


async def test_a_post_to_a_session_engineio_just_closed_gets_400_not_a_traceback(serve, caplog):
    """Engine.IO closes a socket (a ping timeout, say) and keeps it in its table until the
    next lookup: a POST arriving then would raise KeyError inside Engine.IO."""
    served = serve(PROTOCOL_POLICY, setup=app)
    caplog.set_level(logging.INFO)
    async with joined_polling(served) as raw:
        (eio_sid,) = served.sio.eio.sockets
        socket = served.sio.eio.sockets[eio_sid]
        await served.run(socket.close(wait=False, abort=True))
        assert eio_sid in served.sio.eio.sockets  # closed, not yet forgotten
        status = await raw.post('421["echo","late"]')

    assert status == 400
    assert not [r for r in caplog.records if r.exc_info], "a traceback for a late request"
