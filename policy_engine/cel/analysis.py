"""Static facts about CEL sources that let the engine skip evaluations on the hot path.

At roughly 85 us of server CPU per Socket.IO event, every microsecond of policy work is
about one percent of capacity. Most conditions start with a test of the event name
(``event.name == "oh_user_action" && ...``) and many keys are a plain field
(``conn.sid``): recognising those shapes once, at compile time, turns a CEL evaluation
into a set lookup or a dict read. The analysis is conservative: when it is not certain
of a shape it returns nothing, and the expression is simply evaluated.
"""

from __future__ import annotations

import re

_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''
_NAME_EQ = re.compile(rf"\s*event\.name\s*==\s*({_STRING})\s*")
_NAME_IN = re.compile(
    rf"\s*event\.name\s+in\s*\[\s*((?:{_STRING})(?:\s*,\s*(?:{_STRING}))*)\s*,?\s*\]\s*"
)
_LITERAL = re.compile(_STRING)
# An identifier, or a number (digits, then letters, digits and dots: 1.5e3, 0xFF, 3u).
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9][0-9A-Za-z_.]*")
_KEYWORDS = frozenset({"true", "false", "null", "in"})
_PATH = re.compile(r"\s*([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)\s*")


def event_name_filter(source: str) -> tuple[frozenset[str] | None, str | None]:
    """The event names the expression requires, and what is left to evaluate after that test.

    Recognised: ``event.name == "x"`` or ``event.name in ["x", "y"]`` standing alone or as
    the first operand of a top-level ``&&`` chain (no top-level ``||``, which binds looser).
    The rest is None when the name test is the whole expression; otherwise it is the
    remainder of the chain, which alone decides once the name matched (``&&`` is
    commutative in CEL, so evaluating it alone gives the same answer).
    """
    head, rest = _first_conjunct(source)
    if head is None:
        return None, None
    for pattern in (_NAME_EQ, _NAME_IN):
        match = pattern.fullmatch(head)
        if match:
            names = frozenset(_unquote(m) for m in _LITERAL.findall(match.group(1)))
            return names, rest
    return None, None


def conjuncts(source: str) -> list[str] | None:
    """The operands of a top-level ``&&`` chain (one for a source without one).

    None when the source has a top-level ``||`` or ``?``, whose operands are not all
    required for the whole to be true.
    """
    parts: list[str] = []
    rest: str | None = source
    while rest is not None:
        head, rest = _first_conjunct(rest)
        if head is None:
            return None
        parts.append(head.strip())
    return parts


def names_read(source: str) -> frozenset[str]:
    """The top-level names an expression may read, found without parsing it.

    Every identifier outside strings that is neither a member (after ``.``) nor called
    (before ``(``) nor a literal keyword. A comprehension's own variable
    (``list.all(x, x > 1)``) counts too: the answer may hold more than the variables, never
    fewer, so "reads only these" is never wrongly true.
    """
    names: set[str] = set()
    index = 0
    while index < len(source):
        char = source[index]
        if char in "\"'":
            index = _after_string(source, index)
            continue
        token = _TOKEN.match(source, index)
        if token is None:
            index += 1
            continue
        text, end = token.group(), token.end()
        if (char.isalpha() or char == "_") and source[end : end + 1] not in ("'", '"'):
            member = source[:index].rstrip().endswith(".")
            called = source[end:].lstrip().startswith("(")
            if not member and not called and text not in _KEYWORDS:
                names.add(text)
        index = end
    return frozenset(names)


def field_path(source: str) -> tuple[str, str] | None:
    """``("conn", "sid")`` for the source ``conn.sid``; None for anything else."""
    match = _PATH.fullmatch(source)
    return (match.group(1), match.group(2)) if match else None


def _first_conjunct(source: str) -> tuple[str | None, str | None]:
    """Split at the first top-level ``&&``; refuse sources with a top-level ``||`` or ``?``."""
    depth = 0
    index = 0
    split = -1
    while index < len(source):
        char = source[index]
        if char in "\"'":
            index = _after_string(source, index)
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif (depth == 0 and source.startswith("||", index)) or (depth == 0 and char == "?"):
            return None, None
        elif depth == 0 and split < 0 and source.startswith("&&", index):
            split = index
        index += 1
    if split < 0:
        return source, None
    return source[:split], source[split + 2 :]


def _after_string(source: str, start: int) -> int:
    """The index just past the CEL string literal whose opening quote is at ``start``.

    Handles the four quote forms (``'``, ``"``, and the triple ones, which may hold the
    other quotes unescaped) and raw strings (an ``r`` or ``R`` prefix, possibly with ``b``
    or ``B``), in which a backslash escapes nothing.
    """
    quote = source[start]
    prefix = start
    while prefix > 0 and start - prefix < 2 and source[prefix - 1] in "rRbB":
        prefix -= 1
    if prefix > 0 and _is_name(source[prefix - 1]):
        prefix = start  # the end of a longer name, not a literal's prefix
    raw = "r" in source[prefix:start].lower()
    closing = quote * 3 if source.startswith(quote * 3, start) else quote
    index = start + len(closing)
    while index < len(source):
        if source[index] == "\\" and not raw:
            index += 2
        elif source.startswith(closing, index):
            return index + len(closing)
        else:
            index += 1
    return len(source)


def _is_name(char: str) -> bool:
    return char.isalnum() or char == "_"


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return body.encode().decode("unicode_escape") if "\\" in body else body
