"""The values of CEL literal tokens, read exactly as cel-expr-python reads them.

celpy's grammar accepts a few literals the C++ parser reads differently (an escape it does
not know, a carriage return it normalises, an int out of range). Whoever needs a literal's
value (the fast path, the event-name facts) gets it from here or, where the two could
disagree, gets None and leaves the expression to the engine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from lark import Token

INT64_MIN: Final = -(2**63)

_INT_LITERAL: Final = re.compile(r"-?(?:0|[1-9][0-9]*)|-?0x[0-9a-fA-F]+")
_ESCAPE: Final = re.compile(
    r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-3][0-7]{2}|[abfnrtv\\\"'`?])"
)
_COOKED: Final = re.compile(rf"(?:[^\\\r]|{_ESCAPE.pattern})*", re.S)
_SIMPLE_ESCAPES: Final[Mapping[str, str]] = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "`": "`",
    "?": "?",
}
STRING_TOKENS: Final = frozenset({"STRING_LIT", "MLSTRING_LIT"})


class _BadCodePointError(Exception):
    """A surrogate or a code point beyond Unicode, which the C++ engine refuses."""


def int_value(text: str) -> int | None:
    """An ``INT_LIT``'s value; None outside the signed 64-bit range or the usual forms."""
    if not _INT_LITERAL.fullmatch(text):
        return None
    value = int(text, 16) if "x" in text else int(text)
    if not INT64_MIN <= value < -INT64_MIN:
        return None
    return value


def string_value(literal: Token) -> str | None:
    """A string literal token's value (raw and triple-quoted too); None if unsure."""
    if literal.type not in STRING_TOKENS:
        return None
    text = str(literal)
    raw = text[:1] in "rR"
    body = text[1:] if raw else text
    quote = 3 if body[:3] in ('"""', "'''") else 1
    content = body[quote:-quote]
    if "\r" in content:
        return None  # the C++ parser normalises line ends
    if raw:
        return content
    if not _COOKED.fullmatch(content):
        return None
    try:
        return _ESCAPE.sub(_unescape, content)
    except _BadCodePointError:
        return None


def _unescape(match: re.Match[str]) -> str:
    escape = match.group()[1:]
    if escape[0] in "xuU":
        code = int(escape[1:], 16)
    elif escape[0].isdigit():
        code = int(escape, 8)
    else:
        return _SIMPLE_ESCAPES[escape]
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        raise _BadCodePointError(code)
    return chr(code)
