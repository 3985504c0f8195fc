"""The admission queue: its bounds, the retry time it advises, and connects that wait their
turn on a real server instead of being refused."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from servers import WAIT, eventually

from policy_engine.adapter.admission import sized_backoff
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.admission import AdmissionQueue, Ticket
from policy_engine.errors import PolicyError
from policy_engine.language.model import AdmissionSpec

LINE = ("connections/max_total", "")
RATE_LINE = ("rate_limits/connect-global", "global")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def joined(result: Ticket | float) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def test_a_connect_joins_while_the_bounds_hold_and_is_refused_past_the_length():
    queue = AdmissionQueue(Clock())
    spec = AdmissionSpec(max_wait=60.0, max_length=2)

    first = joined(queue.join(LINE, spec, 2.0, 60.0, "a"))
    second = joined(queue.join(LINE, spec, 2.0, 60.0, "b"))
    third = queue.join(LINE, spec, 2.0, 60.0, "c")

    assert queue.waiting == 2
    # Two waiting and itself, one admission per 2 s (the refusal's own retry time): 6 s.
    assert third == pytest.approx(6.0)
    assert first.key == second.key == LINE


def test_a_wait_longer_than_the_connects_bound_is_refused_with_that_wait():
    queue = AdmissionQueue(Clock())
    spec = AdmissionSpec(max_wait=3.0, max_length=100)

    joined(queue.join(LINE, spec, 1.0, 3.0, "a"))
    joined(queue.join(LINE, spec, 1.0, 3.0, "b"))
    joined(queue.join(LINE, spec, 1.0, 3.0, "c"))
    fourth = queue.join(LINE, spec, 1.0, 3.0, "d")

    assert fourth == pytest.approx(4.0)
    assert queue.waiting == 3


def test_the_advised_wait_comes_from_the_measured_admission_rate():
    clock = Clock()
    queue = AdmissionQueue(clock)
    spec = AdmissionSpec(max_wait=60.0, max_length=100)
    tickets = [joined(queue.join(RATE_LINE, spec, 0.5, 60.0, str(n))) for n in range(8)]
    for ticket in tickets[:5]:  # five admitted, 0.1 s apart: 12.5 per second
        ticket.admitted()
        clock.now += 0.1
    clock.now -= 0.1

    waiting = queue.wait_for(RATE_LINE, 0.01)

    assert queue.waiting == 3
    assert waiting == pytest.approx(4 / 12.5)  # three waiting and the newcomer
    # Never less than the refusal's own retry time.
    assert queue.wait_for(RATE_LINE, 1.0) == pytest.approx(1.0)


def test_admissions_older_than_the_window_no_longer_count():
    clock = Clock()
    queue = AdmissionQueue(clock)
    spec = AdmissionSpec(max_wait=60.0, max_length=100)
    for n in range(3):
        joined(queue.join(RATE_LINE, spec, 0.5, 60.0, str(n))).admitted()
        clock.now += 0.1
    clock.now += 30

    assert queue.wait_for(RATE_LINE, 0.5) == pytest.approx(0.5)  # back to the hint


def test_without_a_queue_every_join_is_refused_with_the_lines_wait():
    queue = AdmissionQueue(Clock())

    assert queue.join(LINE, AdmissionSpec(), 5.0, 0.0, "a") == pytest.approx(5.0)
    assert queue.waiting == 0


def test_a_place_is_given_up_once_whichever_path_ends_it():
    queue = AdmissionQueue(Clock())
    spec = AdmissionSpec(max_wait=60.0, max_length=10)
    first = joined(queue.join(LINE, spec, 1.0, 60.0, "a"))
    second = joined(queue.join(LINE, spec, 1.0, 60.0, "b"))

    first.admitted()
    first.leave()
    queue.abandon("b")
    second.leave()
    queue.abandon("b")

    assert queue.waiting == 0
    assert queue.sessions == {}
    assert queue.line(LINE) is not None
    assert not queue.line(LINE).tickets  # type: ignore[union-attr]


async def test_the_next_in_line_gets_its_turn_when_the_first_leaves():
    queue = AdmissionQueue()
    spec = AdmissionSpec(max_wait=60.0, max_length=10)
    first = joined(queue.join(LINE, spec, 0.0, 60.0, "a"))
    second = joined(queue.join(LINE, spec, 0.0, 60.0, "b"))
    order: list[str] = []

    async def wait(ticket: Ticket, name: str) -> None:
        if await ticket.turn(0.0, queue.clock() + WAIT):
            order.append(name)
            ticket.admitted()

    waiting = asyncio.gather(wait(second, "b"), wait(first, "a"))
    await waiting

    assert order == ["a", "b"]


async def test_an_abandoned_place_ends_its_wait_at_once():
    queue = AdmissionQueue()
    spec = AdmissionSpec(max_wait=60.0, max_length=10)
    joined(queue.join(LINE, spec, 20.0, 60.0, "a"))
    second = joined(queue.join(LINE, spec, 20.0, 60.0, "b"))
    turn = asyncio.ensure_future(second.turn(20.0, queue.clock() + 60.0))
    await asyncio.sleep(0)

    queue.abandon("b")

    assert await asyncio.wait_for(turn, WAIT) is False
    assert queue.waiting == 1


def test_a_ceiling_refusal_stands_at_the_gate_until_a_release():
    queue = AdmissionQueue(Clock())
    queue.refused(LINE, {"code": "TOO_MANY_CONNECTIONS"}, 5.0, "")
    queue.refused(("connections/max_per_ip", "10.0.0.1"), {"code": "X"}, 9.0, "ip:10.0.0.1")

    standing = queue.gate_refusal(("", "ip:10.0.0.9"))
    other = queue.gate_refusal(("", "ip:10.0.0.1"))
    queue.released()
    after = queue.gate_refusal(("", "ip:10.0.0.9"))

    assert standing == ({"code": "TOO_MANY_CONNECTIONS"}, pytest.approx(5.0))
    assert other == ({"code": "X"}, pytest.approx(9.0))  # the longer of the two
    assert after is None


def test_a_rate_refusal_stands_at_the_gate_only_until_its_retry_time():
    clock = Clock()
    queue = AdmissionQueue(clock)
    queue.refused(RATE_LINE, {"code": "RATE_LIMITED"}, 0.5, "")

    before = queue.gate_refusal(("",))
    queue.released()  # a release frees no rate limit
    still = queue.gate_refusal(("",))
    clock.now += 0.5

    assert before is not None
    assert still is not None
    assert queue.gate_refusal(("",)) is None
    assert not queue.has_gate_lines


@pytest.mark.parametrize(("retry_ms", "cap"), [(4000, 8000), (100, 500), (60_000, 30_000)])
def test_the_advised_backoff_stops_growing_past_twice_the_lines_wait(retry_ms, cap):
    backoff = {"strategy": "full_jitter", "base_ms": 500, "max_ms": 30_000, "max_attempts": 10}

    sized = sized_backoff(backoff, retry_ms)

    assert sized == {**backoff, "max_ms": cap}
    assert sized_backoff(None, retry_ms) is None


QUEUE_POLICY = """
version: 1
connections:
  max_total: 1
  retry_after: 2s
  queue:
    max_wait: MAX_WAIT
    max_length: 1
"""


def queue_policy(max_wait: str = "8s") -> str:
    return QUEUE_POLICY.replace("MAX_WAIT", max_wait)


def test_the_queue_settings_compile_and_default_to_no_queue():
    compiled = compile_text(queue_policy("750ms")).policy.connections.queue
    default = compile_text("version: 1\n").policy.connections.queue

    assert compiled == AdmissionSpec(max_wait=0.75, max_length=1)
    assert default.max_wait == 0.0


@pytest.mark.parametrize("setting", ["max_length: 0", "max_wait: soon", "wait: 1s"])
def test_a_broken_queue_setting_is_rejected_with_its_location(setting):
    text = f"version: 1\nconnections:\n  queue:\n    {setting}\n"

    with pytest.raises(PolicyError) as raised:
        compile_text(text)

    [diagnostic] = raised.value.diagnostics
    assert diagnostic.location.line == 4
    assert diagnostic.location.pointer.startswith("/connections/queue")
    assert diagnostic.hint or diagnostic.message


async def test_a_connect_over_the_ceiling_waits_and_is_admitted_when_a_slot_frees(serve, clients):
    served = serve(queue_policy())
    holder, _ = await clients.connect(served.url)
    waiter, _ = clients.new()

    waiting = asyncio.ensure_future(
        waiter.connect(served.url, transports=["websocket"], namespaces=["/"], wait_timeout=WAIT)
    )
    await eventually(lambda: served.adapter.admission.waiting == 1)
    await holder.disconnect()
    await asyncio.wait_for(waiting, WAIT)

    assert waiter.connected
    assert served.adapter.admission.waiting == 0
    outcomes = [d.outcome.value for hook, d, _ in served.observer.decisions if hook == "connect"]
    assert outcomes == ["allow", "allow"]  # judged once more at its turn, not refused


async def test_a_connect_the_full_queue_cannot_hold_is_told_the_lines_real_wait(serve, clients):
    served = serve(queue_policy())
    await clients.connect(served.url)
    waiter, _ = clients.new()
    waiting = asyncio.ensure_future(
        waiter.connect(served.url, transports=["websocket"], namespaces=["/"], wait_timeout=WAIT)
    )
    await eventually(lambda: served.adapter.admission.waiting == 1)

    error = await clients.refused(served.url)

    payload = error["data"]
    assert payload["code"] == "TOO_MANY_CONNECTIONS"
    # One waiting and itself, at one admission per 2 s (nothing admitted yet): 4 s.
    assert payload["retry_after_ms"] == 4000
    assert payload["backoff"]["max_ms"] == 8000  # the shipped 30 s cap, sized to the line
    waiting.cancel()


async def test_a_client_that_leaves_while_queued_gives_its_place_up(serve, clients):
    served = serve(queue_policy("60s"))  # longer than eventually(): only leaving frees it
    holder, _ = await clients.connect(served.url)
    leaver, _ = clients.new()
    leaving = asyncio.ensure_future(
        leaver.connect(served.url, transports=["websocket"], namespaces=["/"], wait_timeout=WAIT)
    )
    await eventually(lambda: served.adapter.admission.waiting == 1)

    await leaver.eio.disconnect()
    await eventually(lambda: served.adapter.admission.waiting == 0)
    leaving.cancel()
    await holder.disconnect()
    # The place is free: the next connect is admitted at once, behind nobody.
    late, _ = await clients.connect(served.url)

    assert late.connected
    assert served.adapter.admission.sessions == {}


async def test_a_refused_ceiling_is_answered_at_the_http_handshake_until_a_release(serve, clients):
    served = serve(queue_policy("0s"))
    holder, _ = await clients.connect(served.url)
    error = await clients.refused(served.url)
    url = f"{served.url}/socket.io/?EIO=4&transport=polling"

    async with aiohttp.ClientSession() as session:
        async with session.get(url) as refused:
            status, retry_after, payload = (
                refused.status,
                refused.headers["Retry-After"],
                await refused.json(),
            )
        await holder.disconnect()
        await eventually(lambda: served.adapter.active_connections() == 0)
        async with session.get(url) as admitted:
            admitted_status = admitted.status

    assert error["data"]["code"] == "TOO_MANY_CONNECTIONS"
    assert (status, retry_after) == (503, "2")
    assert payload["code"] == "TOO_MANY_CONNECTIONS"
    assert 0 < payload["retry_after_ms"] <= 2000
    assert admitted_status == 200
