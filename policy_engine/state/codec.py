"""Replay-buffer payloads as JSON, for stores that keep them outside the process.

Socket.IO payloads are JSON plus ``bytes`` anywhere inside (binary attachments). A byte
string becomes ``{"$bytes": "<base64>"}``; a payload dict that would read as such a tag
(one key, starting with ``$``) is wrapped as ``{"$dict": {...}}``, so every payload comes
back as it went in, tuples as lists (as any JSON transport does). JSON, never pickle:
another process or an operator reading Redis by hand can decode it, and nothing in it runs
code when loaded.
"""

from __future__ import annotations

import base64
from typing import Any

_BYTES = "$bytes"
_DICT = "$dict"


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
