"""Store state as JSON with explicit type tags, for stores that keep it outside the process.

A networked store keeps what the pure strategies return (rate-limit and breaker states) and
what the replay buffers hold (Socket.IO payloads) as text. JSON with a ``"t"`` tag per
state type, never pickle: another process, another version of this package or an operator
reading Redis by hand can all decode it, and nothing in it runs code when loaded. Floats
round-trip exactly (``json`` writes the shortest ``repr``), so a decoded state decides
exactly as the one encoded.

Decoding is strict: a value that is not what this module writes raises
:class:`StateCodecError`, and the store then treats the key as holding no state (its next
write replaces it) rather than feeding a half-read state to an algorithm.

Payloads are JSON plus ``bytes`` anywhere inside (Socket.IO binary attachments). A byte
string becomes ``{"$bytes": "<base64>"}``; a payload dict that would read as such a tag
(one key, starting with ``$``) is wrapped as ``{"$dict": {...}}``, so every payload comes
back as it went in, tuples as lists (as any JSON transport does).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

from policy_engine.algorithms.breaker import BreakerState, Circuit, CountWindow, TimeWindow
from policy_engine.algorithms.ratelimit import (
    FixedWindowState,
    GcraState,
    RateState,
    SlidingLogState,
)

State = RateState | BreakerState

_BYTES = "$bytes"
_DICT = "$dict"


class StateCodecError(ValueError):
    """A stored value is not a state this module wrote."""


def dumps_state(state: State) -> str:
    """One state as compact JSON."""
    return json.dumps(_state_tree(state), separators=(",", ":"))


def loads_state(raw: str | bytes) -> State:
    """The state :func:`dumps_state` wrote; raises :class:`StateCodecError` for anything else."""
    try:
        tree = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateCodecError(f"not JSON: {exc}") from exc
    try:
        return _state_from_tree(_mapping(tree))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateCodecError(f"not a stored state: {exc!r}") from exc


def encode_payload(data: Any) -> Any:
    """``data`` as a JSON-ready tree, byte strings tagged (see the module docstring)."""
    if isinstance(data, bytes | bytearray | memoryview):
        return {_BYTES: base64.b64encode(bytes(data)).decode("ascii")}
    if isinstance(data, dict):
        encoded = {key: encode_payload(value) for key, value in data.items()}
        if len(data) == 1:
            (key,) = data
            if isinstance(key, str) and key.startswith("$"):
                return {_DICT: encoded}  # would read as a tag
        return encoded
    if isinstance(data, list | tuple):
        return [encode_payload(item) for item in data]
    return data


def decode_payload(tree: Any) -> Any:
    """The payload :func:`encode_payload` turned into ``tree``."""
    if isinstance(tree, dict):
        if len(tree) == 1:
            if _BYTES in tree:
                return base64.b64decode(tree[_BYTES])
            if _DICT in tree:
                return {key: decode_payload(value) for key, value in tree[_DICT].items()}
        return {key: decode_payload(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [decode_payload(item) for item in tree]
    return tree


# -- states ------------------------------------------------------------------------------------


def _state_tree(state: State) -> dict[str, Any]:
    if isinstance(state, GcraState):
        return {"t": "gcra", "tat": state.tat}
    if isinstance(state, SlidingLogState):
        # Up to ``limit`` timestamps: packed doubles encode and decode far faster than a
        # JSON list of them.
        packed = struct.pack(f"<{len(state.log)}d", *state.log)
        return {"t": "sliding_log", "log": base64.b64encode(packed).decode("ascii")}
    if isinstance(state, FixedWindowState):
        return {"t": "fixed_window", "start": state.start, "count": state.count}
    window = state.window
    window_tree: dict[str, Any] | None
    if window is None:
        window_tree = None
    elif isinstance(window, CountWindow):
        window_tree = {
            "t": "count",
            "calls": window.calls,
            "failed": window.failed,
            "slow": window.slow,
        }
    else:
        window_tree = {
            "t": "time",
            "buckets": [list(bucket) for bucket in window.buckets],
            "calls": window.calls,
            "failed": window.failed,
            "slow": window.slow,
        }
    return {
        "t": "breaker",
        "circuit": state.circuit.value,
        "since": state.since,
        "window": window_tree,
        "permits": state.permits,
    }


def _packed_times(text: Any) -> tuple[float, ...]:
    if not isinstance(text, str):
        raise StateCodecError("a sliding log is base64 text")
    packed = base64.b64decode(text, validate=True)
    if len(packed) % 8:
        raise StateCodecError("a sliding log is whole doubles")
    times = struct.unpack(f"<{len(packed) // 8}d", packed)
    if not all(map(math.isfinite, times)):
        raise StateCodecError("a sliding log holds finite times only")
    return times


def _state_from_tree(tree: dict[str, Any]) -> State:
    tag = tree["t"]
    if tag == "gcra":
        return GcraState(_float(tree["tat"]))
    if tag == "sliding_log":
        return SlidingLogState(_packed_times(tree["log"]))
    if tag == "fixed_window":
        return FixedWindowState(_float(tree["start"]), _int(tree["count"]))
    if tag == "breaker":
        return BreakerState(
            Circuit(tree["circuit"]),
            _float(tree["since"]),
            _window_from_tree(tree["window"]),
            _int(tree["permits"]),
        )
    raise StateCodecError(f"unknown state type {tag!r}")


def _window_from_tree(tree: Any) -> CountWindow | TimeWindow | None:
    if tree is None:
        return None
    window = _mapping(tree)
    tag = window["t"]
    calls, failed, slow = _int(window["calls"]), _int(window["failed"]), _int(window["slow"])
    if tag == "count":
        return CountWindow(calls, failed, slow)
    if tag == "time":
        buckets = []
        for bucket in _list(window["buckets"]):
            second, bucket_calls, bucket_failed, bucket_slow = (_int(n) for n in _list(bucket))
            buckets.append((second, bucket_calls, bucket_failed, bucket_slow))
        return TimeWindow(tuple(buckets), calls, failed, slow)
    raise StateCodecError(f"unknown breaker window type {tag!r}")


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StateCodecError(f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise StateCodecError(f"expected an array, got {type(value).__name__}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StateCodecError(f"expected a number, got {value!r}")
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateCodecError(f"expected an integer, got {value!r}")
    return value
