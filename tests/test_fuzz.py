"""Hostile clients against a live server under the shipped policy, on both transports.

Each property sends fuzzed traffic on fresh raw connections and checks what every client
is owed: an answer to each event that asked for one (the result, or the documented
refusal payload), or a close with a classified notice; nothing internal in anything
received; no traceback in the server's log for client input; a quiet client beside the
fuzzer still served; the server's memory bounded. ``FUZZ_EXAMPLES`` raises the number of
examples per property and ``FUZZ_SHRINK=1`` shrinks a failing one; ``make fuzz`` runs the
long version, ``benchmarks/fuzz_run.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz.exchanges import Conversation, abuse, converse
from fuzz.harness import LogCapture, QuietClient, fuzz_app, fuzz_policy, rss_mb
from fuzz.strategies import Event, RawPacket, handled_events, hostile_named_events, raw_packets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from servers import Served, start_server

# In the default run at EXAMPLES per property, derandomized so that CI replays the same
# traffic; `make fuzz` raises FUZZ_EXAMPLES, draws new examples and adds the long run.
pytestmark = [
    pytest.mark.fuzz,
    # A fuzzed payload of a megabyte makes a large repr: expected, and not a failure.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
# Shrinking waits out every unanswered event again, for minutes: on request only.
PHASES = [Phase.explicit, Phase.generate] + (
    [Phase.shrink] if os.environ.get("FUZZ_SHRINK") else []
)
RSS_SLACK_MB = 300.0
TRANSPORTS = ["websocket", "polling"]

fuzzing = settings(
    max_examples=EXAMPLES,
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Target:
    """The live server, its log, the quiet client and the memory it started with."""

    def __init__(self, served: Served, log: LogCapture, quiet: QuietClient) -> None:
        self.served = served
        self.log = log
        self.quiet = quiet
        self.rss_before = rss_mb()

    def check(self, conversation: Conversation) -> None:
        """What every fuzzed connection must leave behind."""
        assert conversation.connected, f"connect refused: {conversation.refused}"
        assert not conversation.leaks, f"internals sent to the client: {conversation.leaks}"
        assert not conversation.stalled, f"requests never answered: {conversation.stalled}"
        tracebacks = self.log.tracebacks()
        self.log.records.clear()
        assert not tracebacks, "a traceback in the server log:\n" + "\n".join(tracebacks)
        for number, exchange in enumerate(conversation.exchanges, start=1):
            assert not exchange.wrong, f"event {number}: {exchange.wrong}"
            assert exchange.answered or exchange.classified_close, (
                f"event {number} on {conversation.transport} was never answered "
                f"(connection closed: {exchange.closed}, with a classified notice: "
                f"{exchange.classified_close})"
            )
        assert not self.quiet.failures, f"the quiet client was not served: {self.quiet.failures}"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    policy = fuzz_policy(Path(tmp_path_factory.mktemp("fuzz-policy")))
    with LogCapture() as log:
        served = start_server(policy, setup=fuzz_app)
        quiet = QuietClient(served.url)
        quiet.start()
        yield Target(served, log, quiet)
        quiet.stop()
        served.live.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
@fuzzing
@given(events=st.lists(handled_events, min_size=1, max_size=3))
def test_every_handled_event_is_answered(target: Target, transport: str, events: list[Event]):
    target.check(asyncio.run(converse(target.served.url, transport, events)))


@pytest.mark.parametrize("transport", TRANSPORTS)
@fuzzing
@given(events=st.lists(hostile_named_events, min_size=1, max_size=2))
def test_events_with_hostile_names_are_answered(
    target: Target, transport: str, events: list[Event]
):
    target.check(asyncio.run(converse(target.served.url, transport, events)))


@pytest.mark.parametrize("transport", TRANSPORTS)
@fuzzing
@given(packets=st.lists(raw_packets, min_size=1, max_size=3))
def test_malformed_packets_neither_wedge_nor_leak(
    target: Target, transport: str, packets: list[RawPacket]
):
    target.check(asyncio.run(abuse(target.served.url, transport, packets)))


def test_the_server_memory_stays_bounded_and_the_quiet_client_was_served(target: Target):
    growth = rss_mb() - target.rss_before
    assert growth < RSS_SLACK_MB, f"server RSS grew {growth:.0f} MB under fuzzing"
    assert target.quiet.answered > 0
    assert not target.quiet.failures, target.quiet.failures
    assert target.quiet.slowest < target.quiet.patience
