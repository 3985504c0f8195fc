"""Hypothesis strategies for what a hostile Socket.IO client sends.

Two families: well-formed events whose names and payloads are chosen to break the layers
behind the wire (reserved names, integers past 64 bits, lone surrogates, NULs, deep
nesting, large but permitted sizes, binary attachments), and raw packets that break the
protocol itself (bad type digits, namespaces, ack ids, attachment placeholders, truncated
JSON, over-long frames). Sizes stay inside the shipped policy's limits unless the point of
a packet is to exceed them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

RESERVED_NAMES = [
    "connect",
    "disconnect",
    "connect_error",
    "disconnecting",
    "newListener",
    "removeListener",
    "message",
    "*",
    "policy_error",
    "__proto__",
    "constructor",
]

#: Events the fuzz app serves (``echo`` returns its arguments, ``ack`` a digest of them).
HANDLED_NAMES = ["echo", "ack", "oh_user_action"]

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=["Cs"]), min_size=1, max_size=4),
    st.sampled_from(["\ud800", "a\udfffb", "ls\u0000; rm -rf /", "\u0000", "\ufeff", "\u202e"]),
    st.text(alphabet='\u0000\ud800\U0001f600é\n\t"\\', max_size=20),
)

big_ints = st.one_of(
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**64) - 2, max_value=-(2**63) + 2),
    # python-engineio refuses integer literals over 100 digits: see ``raw_packets``.
    st.sampled_from([2**64, 2**128, -(2**64), 10**99]),
    st.integers(min_value=-(10**99), max_value=10**99),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    big_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep around one hostile scalar."""
    return st.builds(lambda leaf: _wrap(leaf, depth), scalars)


def _wrap(leaf: Any, depth: int) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"d": value}
    return value


payloads = st.one_of(
    scalars,
    st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=6),
            st.dictionaries(hostile_text, children, max_size=6),
        ),
        max_leaves=30,
    ),
    st.integers(min_value=1, max_value=120).flatmap(nested),
    st.sampled_from([40, 60, 100]).map(lambda n: ["x" * 10] * n),
    # Large but under the default 64 KB event limit once encoded.
    st.integers(min_value=1_000, max_value=50_000).map(lambda n: "y" * n),
    st.integers(min_value=100, max_value=4_000).map(lambda n: list(range(n))),
    st.fixed_dictionaries(
        {"action": hostile_text, "args": st.dictionaries(hostile_text, scalars, max_size=4)}
    ),
)

event_names = st.one_of(
    st.sampled_from(RESERVED_NAMES),
    hostile_text,
    st.integers(min_value=1, max_value=60_000).map(lambda n: "n" * n),
)


@dataclass(frozen=True)
class Event:
    """One Socket.IO event: its name, its arguments and the binary attachments it carries."""

    name: str
    args: list[Any]
    attachments: list[bytes] = field(default_factory=list)


handled_events = st.builds(
    Event,
    st.sampled_from(HANDLED_NAMES),
    st.lists(payloads, min_size=1, max_size=3),
    st.lists(st.binary(max_size=2_000), max_size=2),
)

hostile_named_events = st.builds(
    Event, event_names, st.lists(payloads, max_size=2), st.lists(st.binary(max_size=64), max_size=1)
)


def raw_event_text(event: Event, ack: int | None) -> str:
    """The Engine.IO message for ``event``: ``42`` or, with attachments, ``45<n>-``."""
    body_args: list[Any] = list(event.args)
    for number in range(len(event.attachments)):
        body_args.append({"_placeholder": True, "num": number})
    body = json.dumps([event.name, *body_args], separators=(",", ":"))
    ack_text = "" if ack is None else str(ack)
    if event.attachments:
        return f"45{len(event.attachments)}-{ack_text}{body}"
    return f"42{ack_text}{body}"


@dataclass(frozen=True)
class RawPacket:
    """Engine.IO messages sent as they are: ``texts`` then ``binaries``."""

    texts: list[str]
    binaries: list[bytes] = field(default_factory=list)


_json_bodies = st.one_of(
    st.just("[]"),
    st.just('["echo"'),
    st.just('["echo",{"a":'),
    st.just("{}"),
    st.just('"echo"'),
    st.just("null"),
    st.just("[1,2]"),
    st.just("[null]"),
    st.just('[["echo"]]'),
    st.just('["echo",NaN,Infinity]'),
    st.just("[" * 2_000 + "]" * 2_000),
    st.builds(lambda n: '["echo","' + "z" * n + '"]', st.integers(1_000_001, 1_100_000)),
    st.text(max_size=30),
)

_namespaces = st.one_of(
    st.just(""),
    st.sampled_from(["/nope,", "/admin,", "/,", "//,", "/\u0000,", "/" + "n" * 300 + ","]),
    hostile_text.map(lambda text: "/" + text.replace(",", "") + ","),
)

_ack_ids = st.one_of(
    st.just(""),
    st.integers(min_value=0, max_value=2**70).map(str),
    st.sampled_from(["-1", "00", "1e5", "9" * 40]),
)

_placeholders = st.sampled_from(
    [
        '["echo",{"_placeholder":true,"num":5}]',
        '["echo",{"_placeholder":true,"num":-1}]',
        '["echo",{"_placeholder":true,"num":"0"}]',
        '["echo",{"_placeholder":true}]',
        '["echo",{"_placeholder":"yes","num":0}]',
        '["echo",{"_placeholder":true,"num":0},{"_placeholder":true,"num":0}]',
    ]
)

raw_packets = st.one_of(
    # Socket.IO packets with any type digit, namespace, ack id and body.
    st.builds(
        lambda kind, ns, ack, body: RawPacket([f"4{kind}{ns}{ack}{body}"]),
        st.sampled_from([*list("0123456789"), "", "x", "-"]),
        _namespaces,
        _ack_ids,
        _json_bodies,
    ),
    st.just(RawPacket(["46[]"])),
    st.sampled_from([101, 400, 5_000]).map(lambda n: RawPacket([f'42["echo",{"9" * n}]'])),
    st.just(RawPacket(["451-[]"])),
    # Attachment counts that do not match what follows.
    st.builds(
        lambda count, body, blobs: RawPacket([f"45{count}-1{body}"], blobs),
        st.sampled_from(["0", "1", "2", "99999", "-1", ""]),
        _placeholders,
        st.lists(st.binary(max_size=32), max_size=3),
    ),
    # A binary frame nobody announced.
    st.builds(lambda blob: RawPacket([], [blob]), st.binary(max_size=64)),
    # Engine.IO level: unknown types, upgrade probes mid-session, noops, truncated.
    st.sampled_from(
        [
            RawPacket(["7"]),
            RawPacket(["9garbage"]),
            RawPacket(["5"]),
            RawPacket(["6"]),
            RawPacket(["2probe"]),
            RawPacket([""]),
            RawPacket(["4"]),
            RawPacket(["40"]),
            RawPacket(["41"]),
            RawPacket(["40/nope,"]),
        ]
    ),
    st.builds(lambda text: RawPacket([text]), hostile_text),
)
