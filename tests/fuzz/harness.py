"""A live server under the shipped policy, and the checks every fuzzed exchange must pass.

The policy is the shipped one with one change: ``identity.trusted_proxies`` believes
loopback, so each fuzzed connection can claim an address of its own through
``X-Forwarded-For`` and the per-IP connect limit judges the fuzzer's connections one by
one instead of refusing the sixth. Everything else (limits, schemas, error
classification, sizes) is what ships.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import socketio
from servers import CONTRACT_KEYS

from .strategies import Event
from .wire import Wire, acks, encode_event, open_wire

POLICIES = Path(__file__).resolve().parents[2] / "policies"
#: What no client may ever read: stack traces, source paths, exception reprs.
INTERNALS = re.compile(
    r"Traceback|File \"|\.py\b|/work/|site-packages|Error\(|Exception\(|<[a-zA-Z_.]+ object at"
)


def fuzz_policy(directory: Path) -> Path:
    """The shipped policy beside its schema and key files, trusting loopback as a proxy
    (each fuzzed connection names its own address) and answering unknown events."""
    for name in ("events", "keys"):
        shutil.copytree(POLICIES / name, directory / name, dirs_exist_ok=True)
    text = (POLICIES / "policies.yaml").read_text(encoding="utf-8")
    trusting = text.replace("trusted_proxies: []", "trusted_proxies: [127.0.0.1/32]", 1)
    assert trusting != text, "the shipped policy no longer says trusted_proxies: []"
    # Every event that asks for an ack is owed an answer, unknown ones included.
    answering = trusting.replace(
        "    max_depth: 32", "    max_depth: 32\n    answer_unknown_events: true", 1
    )
    assert answering != trusting, "the shipped policy no longer says max_depth: 32"
    trusting = answering
    path = directory / "policies.yaml"
    path.write_text(trusting, encoding="utf-8")
    return path


def fuzz_app(sio: socketio.AsyncServer) -> None:
    """``echo`` returns its arguments; ``ack`` and ``oh_user_action`` a digest of them."""

    @sio.event
    async def echo(sid: str, *args: Any) -> Any:
        return args

    @sio.event
    async def ack(sid: str, *args: Any) -> Any:
        return {"received": len(args)}

    @sio.event
    async def oh_user_action(sid: str, *args: Any) -> Any:
        return {"received": len(args)}


def expected_answer(event: Event) -> Any:
    """The ack arguments the fuzz app returns when the policy lets ``event`` through."""
    args = [*event.args, *event.attachments]
    if event.name == "echo":
        # JSON joins escaped surrogate pairs into one character on the way in.
        return [json.loads(json.dumps(arg)) for arg in event.args] + event.attachments
    return [{"received": len(args)}]


_addresses = itertools.count(1)


def fresh_address() -> dict[str, str]:
    """An ``X-Forwarded-For`` of its own, from the documentation ranges."""
    number = next(_addresses)
    return {
        "X-Forwarded-For": f"198.{18 + number // 65536 % 2}.{number // 256 % 256}.{number % 256}"
    }


class LogCapture(logging.Handler):
    """Every record at WARNING and above, from every logger, while installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        """The records that carry a traceback, formatted, for an assertion message."""
        formatter = logging.Formatter()
        return [
            _head_and_tail(formatter.format(record))
            for record in self.records
            if record.exc_info or "Traceback" in record.getMessage()
        ]

    def __enter__(self) -> LogCapture:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        logging.getLogger().removeHandler(self)


def _head_and_tail(text: str, keep: int = 1_000) -> str:
    """A long traceback's first and last lines: where it began and what was raised."""
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]}\n[...]\n{text[-keep:]}"


def rss_mb() -> float:
    """This process's resident set (the live server runs in it)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def leaked_internals(wire: Wire) -> list[str]:
    """What the server wrote that reads like a stack trace or an exception.

    Acks that are not refusals carry the client's own data back (the echo), which may
    say anything; everything else the server composed itself.
    """
    found = []
    answers = acks(wire.received)
    echoed = {json.dumps(args, default=repr) for args in answers.values() if not _refusal(args)}
    for packet in wire.received:
        if isinstance(packet, bytes):
            continue
        if packet[:2] in ("43", "46") and _echo_text(packet, echoed):
            continue
        if INTERNALS.search(packet):
            found.append(packet[:500])
    return found


def _refusal(args: list[Any]) -> bool:
    return len(args) == 1 and is_contract_payload(args[0])


def _echo_text(packet: str, echoed: set[str]) -> bool:
    start = packet.find("[")
    try:
        return start >= 0 and json.dumps(json.loads(packet[start:]), default=repr) in echoed
    except ValueError:
        return False


def is_contract_payload(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == CONTRACT_KEYS and bool(value["code"])


@dataclass
class Exchange:
    """What happened to one event sent with an ack id."""

    answered: bool = False
    refused_code: str | None = None
    closed: bool = False
    classified_close: bool = False
    wrong: list[str] = field(default_factory=list)
    late: bool = False  # answered, but only after a longer wait


def has_ack(wire: Wire, ack_id: int) -> bool:
    return ack_for(wire, ack_id) is not None


def ack_for(wire: Wire, ack_id: int) -> list[Any] | None:
    return acks(wire.received).get(ack_id)


def classified_notice(wire: Wire) -> bool:
    """Whether the server told this client why before it closed (an error event or 44)."""
    for packet in wire.socketio_packets():
        if packet.startswith("4"):
            return True
        if packet.startswith("2"):
            try:
                body = json.loads(packet[packet.index("[") :])
            except ValueError:
                continue
            if any(is_contract_payload(arg) for arg in body[1:]):
                return True
    return False


async def await_answer(wire: Wire, ack_id: int, expected: Any, timeout: float) -> Exchange:
    """Wait for the ack of ``ack_id`` and judge it: the result, a refusal, or a close."""
    exchange = Exchange()
    await wire.until(lambda: ack_for(wire, ack_id) is not None, timeout)
    answer = ack_for(wire, ack_id)
    if answer is None:
        exchange.closed = wire.closed
        exchange.classified_close = wire.closed and classified_notice(wire)
        return exchange
    exchange.answered = True
    if len(answer) == 1 and is_contract_payload(answer[0]):
        exchange.refused_code = answer[0]["code"]
    elif expected is not None and answer != expected:
        exchange.wrong.append(f"answer {str(answer)[:300]} is neither {str(expected)[:300]}")
        exchange.wrong[-1] += " nor a contract payload"
    return exchange


def iter_codes(exchanges: list[Exchange]) -> Iterator[str]:
    for exchange in exchanges:
        if exchange.refused_code:
            yield exchange.refused_code


class QuietClient:
    """A well-behaved client beside the fuzzer: one echo at a time, each timed.

    It runs in a thread of its own with its own event loop, so neither the fuzzer's
    examples nor their failures pause it; ``failures`` lists every echo not answered
    within ``patience`` seconds.
    """

    def __init__(self, url: str, patience: float = 3.0, interval: float = 0.05) -> None:
        self.url = url
        self.patience = patience
        self.interval = interval
        self.sent = 0
        self.answered = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quiet-client", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.answered and not self.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.answered:
            raise RuntimeError(f"the quiet client was never served: {self.failures}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._converse())

    async def _converse(self) -> None:
        async with aiohttp.ClientSession() as session:
            wire = await open_wire(session, self.url, "websocket", headers=fresh_address())
            await wire.send("40")
            await wire.until(lambda: any(p.startswith("0") for p in wire.socketio_packets()))
            try:
                while not self._stop.is_set():
                    self.sent += 1
                    ack_id = self.sent
                    started = time.monotonic()
                    await wire.send(encode_event("echo", [ack_id], ack_id))
                    await wire.until(partial(has_ack, wire, ack_id), self.patience)
                    answer = ack_for(wire, ack_id)
                    if answer == [ack_id]:
                        self.answered += 1
                        self.slowest = max(self.slowest, time.monotonic() - started)
                    else:
                        self.failures.append(f"echo {ack_id}: {answer!r}, closed={wire.closed}")
                        if wire.closed:
                            return
                    wire.received.clear()
                    await asyncio.sleep(self.interval)
            finally:
                await wire.close()
