"""The long fuzz run: a live server under the shipped policy, hostile traffic, a report.

``make fuzz`` (or ``python -m benchmarks.fuzz_run --events 100000``) starts the server the
fuzz suite uses (tests/fuzz), runs ``--connections`` raw clients at once, alternating
WebSocket and long-polling, each sending a mix drawn from the suite's strategies (handled
events with hostile payloads, hostile event names, malformed packets) with an ack id, and
a quiet client beside them. It prints what was sent, answered, refused by code and closed,
what went unanswered, what leaked, the tracebacks logged and the server's RSS before and
after. It exits non-zero when a property the suite checks did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz.exchanges import ANSWER_WAIT, PROBE_ACK, join, send_event, send_raw, utf8
from fuzz.harness import (
    Exchange,
    LogCapture,
    QuietClient,
    await_answer,
    classified_notice,
    expected_answer,
    fresh_address,
    fuzz_app,
    fuzz_policy,
    leaked_internals,
    rss_mb,
)
from fuzz.strategies import handled_events, hostile_named_events, raw_packets
from fuzz.wire import Wire, encode_event, open_wire
from hypothesis.errors import NonInteractiveExampleWarning
from servers import start_server

EVENTS_PER_CONNECTION = 200
LATE_WAIT = 10.0


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.refused: Counter[str] = Counter()
        self.closed = 0
        self.unanswered: list[str] = []
        self.unanswered_by_kind: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.leaks: list[str] = []
        self.connections = 0
        self.connect_refused: list[str] = []
        self.stalled: list[str] = []
        self.late = 0  # answered, but after ANSWER_WAIT
        self.transport_failed = 0  # WebSocket text frames that were not UTF-8


def draw(kind: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        strategy = {"handled": handled_events, "named": hostile_named_events}.get(kind, raw_packets)
        return strategy.example()


async def exchange_one(wire: Wire, kind: str, sent: int) -> tuple[Exchange, str] | None:
    """Send one drawn event (a raw packet is followed by an echo probe) and wait for its
    answer; None when the packet ends the connection at the WebSocket layer, or the client
    closed its own session with it."""
    ack_id = sent
    if kind == "raw":
        packet = draw(kind)
        if wire.transport == "websocket" and not all(map(utf8, packet.texts)):
            # RFC 6455, 8.1: a text frame that is not UTF-8 fails the connection at the
            # transport, before anything above it could answer.
            await send_raw(wire, packet)
            return None
        if await send_raw(wire, packet):
            return None  # the client closed its own session: nothing more is owed
        ack_id = PROBE_ACK + sent
        expected: Any = ["probe"]
        await wire.send(encode_event("echo", expected, ack_id))
        exchange = await await_answer(wire, ack_id, expected, ANSWER_WAIT)
        label = f"raw {packet!r}"[:300]
    else:
        event = draw(kind)
        expected = expected_answer(event)
        exchange = await send_event(wire, event, ack_id, ANSWER_WAIT)
        label = f"{kind} {event!r}"[:300]
    if not exchange.answered and not exchange.closed:
        # The fuzzer draws examples on the server's interpreter (one GIL): an answer may
        # just be late. Late is counted; never answered is a failure.
        exchange = await await_answer(wire, ack_id, expected, LATE_WAIT)
        exchange.late = exchange.answered
    return exchange, label


async def one_connection(url: str, transport: str, budget: int, tally: Tally) -> int:
    """Send up to ``budget`` events on one connection; returns how many were sent."""
    sent = 0
    async with aiohttp.ClientSession() as session:
        wire = await open_wire(session, url, transport, headers=fresh_address())
        tally.connections += 1
        try:
            refused = await join(wire)
            if refused:
                tally.connect_refused.append(refused[:200])
                return 1
            history: list[str] = []
            notified = False
            while sent < budget and not wire.closed:
                kind = random.choices(["handled", "named", "raw"], [6, 2, 2])[0]
                sent += 1
                tally.sent += 1
                result = await exchange_one(wire, kind, sent)
                if result is None:
                    tally.transport_failed += 1
                    return sent
                exchange, label = result
                tally.late += exchange.late
                if exchange.answered:
                    tally.answered += 1
                    if exchange.refused_code:
                        tally.refused[exchange.refused_code] += 1
                elif exchange.closed:
                    tally.closed += 1
                    if not (exchange.classified_close or notified or classified_notice(wire)):
                        tally.unanswered_by_kind[kind] += 1
                        tally.unanswered.append(f"{transport} closed without notice: {label}")
                else:
                    # Left unanswered: the connection may be wedged, so a fresh one goes on.
                    tally.unanswered_by_kind[kind] += 1
                    tally.unanswered.append(f"{transport}: {label} after {history}")
                    tally.leaks.extend(leaked_internals(wire))
                    return sent
                history = [*history[-2:], label[:120]]
                tally.wrong.extend(exchange.wrong)
                tally.leaks.extend(leaked_internals(wire))
                notified = notified or classified_notice(wire)  # it may precede the close
                wire.received.clear()
            tally.leaks.extend(leaked_internals(wire))
        finally:
            await wire.close()
            tally.stalled.extend(f"{transport}: {start!r}" for start in wire.stalled)
    return sent


async def worker(url: str, transport: str, share: int, tally: Tally) -> None:
    while share > 0:
        share -= await one_connection(url, transport, min(share, EVENTS_PER_CONNECTION), tally)


async def fuzz(url: str, events: int, connections: int, tally: Tally) -> None:
    share = events // connections
    await asyncio.gather(
        *(worker(url, ("websocket", "polling")[n % 2], share, tally) for n in range(connections))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    random.seed(options.seed)
    with tempfile.TemporaryDirectory() as directory, LogCapture() as log:
        served = start_server(fuzz_policy(Path(directory)), setup=fuzz_app)
        quiet = QuietClient(served.url)
        quiet.start()
        rss_before = rss_mb()
        started = time.monotonic()
        tally = Tally()
        try:
            asyncio.run(fuzz(served.url, options.events, options.connections, tally))
        finally:
            elapsed = time.monotonic() - started
            rss_after = rss_mb()
            quiet.stop()
            served.live.stop()
        tracebacks = log.tracebacks()
    report(
        tally,
        elapsed=elapsed,
        rss_before=rss_before,
        rss_after=rss_after,
        quiet=quiet,
        tracebacks=tracebacks,
    )
    failed = (
        tally.unanswered
        or tally.stalled
        or tally.wrong
        or tally.leaks
        or tracebacks
        or quiet.failures
    )
    return 1 if failed else 0


def report(
    tally: Tally,
    *,
    elapsed: float,
    rss_before: float,
    rss_after: float,
    quiet: QuietClient,
    tracebacks: list[str],
) -> None:
    print(
        f"events sent          {tally.sent} in {elapsed:.0f} s on {tally.connections} connections"
    )
    print(f"answered             {tally.answered} ({tally.late} after {ANSWER_WAIT:.0f} s)")
    for code, count in tally.refused.most_common():
        print(f"  refused {code:<20} {count}")
    print(f"connections closed   {tally.closed}")
    print(f"  by the client or its WebSocket (not UTF-8) {tally.transport_failed}")
    print(f"connects refused     {len(tally.connect_refused)} {tally.connect_refused[:3]}")
    print(f"unanswered           {len(tally.unanswered)} {dict(tally.unanswered_by_kind)}")
    for line in tally.unanswered[:10]:
        print(f"  {line[:600]}")
    print(f"requests stalled     {len(tally.stalled)} {tally.stalled[:3]}")
    print(f"wrong answers        {len(tally.wrong)} {tally.wrong[:3]}")
    print(f"internals leaked     {len(tally.leaks)} {tally.leaks[:3]}")
    print(f"tracebacks logged    {len(tracebacks)}")
    for last_line, count in Counter(text.splitlines()[-1] for text in tracebacks).most_common(8):
        print(f"  {count:6}  {last_line[:120]}")
    print(
        f"quiet client         {quiet.answered}/{quiet.sent} answered, slowest "
        f"{quiet.slowest * 1000:.0f} ms, failures {quiet.failures[:3]}"
    )
    print(f"process RSS (server and fuzzer) {rss_before:.0f} MB before, {rss_after:.0f} MB after")


if __name__ == "__main__":
    sys.exit(main())
