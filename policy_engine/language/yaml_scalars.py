"""How a YAML scalar becomes a Python value: ``yaml.safe_load``'s rules, minus three traps.

Each exception is a value silently reinterpreted by YAML 1.1: booleans follow YAML 1.2
(only ``true``/``false``, so ``on``, ``no``, ``y`` stay strings), timestamps stay strings,
and sexagesimal numbers (``1:30``) stay strings.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

CORE_TAG: Final = "tag:yaml.org,2002:"

_INT: Final = re.compile(
    r"[-+]?0b[01_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
)
_FLOAT: Final = re.compile(
    r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?"
    r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_NULLS: Final = frozenset({"", "~", "null", "Null", "NULL"})
_BOOLS: Final = {
    "true": True,
    "True": True,
    "TRUE": True,
    "false": False,
    "False": False,
    "FALSE": False,
}
_NUMBER_START: Final = frozenset("0123456789+-.")


def _to_int(value: str) -> int:
    if _INT.fullmatch(value) is None:
        raise ValueError(value)
    digits = value.replace("_", "")
    sign = -1 if digits[0] == "-" else 1
    digits = digits.lstrip("+-")
    if digits.startswith("0b"):
        return sign * int(digits[2:], 2)
    if digits.startswith("0x"):
        return sign * int(digits[2:], 16)
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits, 8)
    return sign * int(digits)


def _to_float(value: str) -> float:
    if _FLOAT.fullmatch(value) is None:
        raise ValueError(value)
    digits = value.replace("_", "").lower()
    if digits.endswith("inf"):
        return -math.inf if digits[0] == "-" else math.inf
    if digits.endswith("nan"):
        return math.nan
    return float(digits)


def _to_tagged_float(value: str) -> float:
    """``!!float 1`` is 1.0, as in ``yaml.safe_load``."""
    return float(_to_int(value)) if _INT.fullmatch(value) else _to_float(value)


def _to_bool(value: str) -> bool:
    try:
        return _BOOLS[value]
    except KeyError:
        raise ValueError(value) from None


def _to_null(value: str) -> None:
    if value not in _NULLS:
        raise ValueError(value)


def resolve_plain(value: str) -> Any:
    """Type an untagged plain scalar: YAML 1.1 numbers and nulls, YAML 1.2 booleans."""
    if value[:1] in _NUMBER_START:
        for convert in (_to_int, _to_float):
            try:
                return convert(value)
            except ValueError:
                pass
        return value
    if value in _NULLS:
        return None
    return _BOOLS.get(value, value)


TAGGED_SCALARS: Final = {
    f"{CORE_TAG}int": _to_int,
    f"{CORE_TAG}float": _to_tagged_float,
    f"{CORE_TAG}bool": _to_bool,
    f"{CORE_TAG}null": _to_null,
}
MAPPING_TAGS: Final = frozenset({None, "!", f"{CORE_TAG}map"})
SEQUENCE_TAGS: Final = frozenset({None, "!", f"{CORE_TAG}seq"})


def show_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(CORE_TAG) if tag.startswith(CORE_TAG) else tag


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a string"
