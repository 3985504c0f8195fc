"""CEL's semantics on plain JSON values, as cel-expr-python applies them, for the fast path.

Each function is what one CEL operation does when the operands' types are known only at
run time (a ``dyn`` value from ``claims`` or ``event.payload``): heterogeneous equality,
ordering within numbers, strings and bools, ``in`` over lists and maps, indexing,
``size()``, ``!`` and ``?:``. Every failure is an :class:`EvaluationError`, as the engine's
error values are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NoReturn

from policy_engine.cel.checks import article, label
from policy_engine.errors import EvaluationError

Activation = Mapping[str, Any]
Evaluator = Callable[[Activation], Any]

NUMBERS: Final = frozenset({int, float})
_ORDERED: Final = frozenset({int, float, str, bool})


def fail(message: str) -> NoReturn:
    raise EvaluationError(message)


def describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no such key: {exc.args[0]!r}" if exc.args else "no such key"
    if isinstance(exc, TypeError):
        return f"no matching overload: {exc}"
    return str(exc) or type(exc).__name__


def equal(left: Any, right: Any) -> bool:
    """CEL's heterogeneous equality: numbers across int and double, containers deeply."""
    pending = [(left, right)]
    while pending:
        first, second = pending.pop()
        kind, other = type(first), type(second)
        if kind is other:
            if kind is list:
                if len(first) != len(second):
                    return False
                pending.extend(zip(first, second, strict=True))
            elif kind is dict:
                if len(first) != len(second):
                    return False
                for key, value in first.items():
                    if key not in second:
                        return False
                    pending.append((value, second[key]))
            elif first != second:
                return False
        elif kind in NUMBERS and other in NUMBERS:
            if float(first) != float(second):
                return False
        else:
            return False
    return True


def order(symbol: str, compare: Callable[[Any, Any], bool], left: Any, right: Any) -> bool:
    kind, other = type(left), type(right)
    if kind is other and kind in _ORDERED:
        return compare(left, right)
    if kind in NUMBERS and other in NUMBERS:
        return compare(float(left), float(right))
    fail(f"no matching overload for '{symbol}' applied to ({label(left)}, {label(right)})")


def in_strings(value: Any, strings: frozenset[str]) -> bool:
    return type(value) is str and value in strings


def in_list(value: Any, items: Iterable[Any]) -> bool:
    return any(equal(value, item) for item in items)


def contains(value: Any, container: Any) -> bool:
    kind = type(container)
    if kind is list:
        return in_list(value, container)
    if kind is dict:
        key_kind = type(value)
        if key_kind is str:
            return value in container
        if key_kind is bool:
            return any(type(key) is bool and key is value for key in container)
        if key_kind in NUMBERS:
            # An int key matches a number equal to it; a double key cannot exist.
            return any(type(key) is int and key == value for key in container)
    fail(f"no matching overload for 'in' applied to ({label(value)}, {label(container)})")


def item(container: Any, index: int) -> Any:
    kind = type(container)
    if kind is list:
        if 0 <= index < len(container):
            return container[index]
        fail(f"index {index} out of range for a list of {len(container)}")
    if kind is dict:
        for key, value in container.items():
            if type(key) is int and key == index:
                return value
        fail(f"no such key: {index}")
    fail(f"cannot index {article(label(container))}")


def has_key(container: Any, name: str) -> bool:
    if type(container) is dict:
        return name in container
    fail(f"has() on {article(label(container))}, not a map")


def length(value: Any) -> int:
    if type(value) in (str, list, dict):
        return len(value)
    fail(f"no matching overload for size({label(value)})")


def negate(value: Any) -> bool:
    if type(value) is bool:
        return not value
    fail(f"no matching overload for '!' applied to {article(label(value))}")


def choose(condition: Any, then: Evaluator, otherwise: Evaluator, a: Activation) -> Any:
    if condition is True:
        return then(a)
    if condition is False:
        return otherwise(a)
    fail(f"the condition of '?:' is {article(label(condition))}, not a bool")


def text(value: Any) -> str:
    if type(value) is str:
        return value
    fail(f"no matching overload for '+' applied to {article(label(value))} and a string")


def string_call(
    name: str, method: Callable[[str, str], bool], receiver: Any, argument: Any
) -> bool:
    if type(receiver) is str and type(argument) is str:
        return method(receiver, argument)
    fail(f"no matching overload for ({label(receiver)}).{name}({label(argument)})")
