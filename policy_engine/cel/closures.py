"""The fast path's building blocks: compiled sub-expressions and the closures of operators.

Each builder takes the :class:`Node` of its operands and returns the cheapest closure the
operands' declared types allow: a test against a literal becomes a set lookup or a bound
comparison, a chain of field reads one subscript chain; only ``dyn`` operands pay for
CEL's run-time type rules (:mod:`policy_engine.cel.values`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from policy_engine.cel import values
from policy_engine.cel.checks import RESULT_TYPES, article, container, label
from policy_engine.cel.values import Activation, Evaluator
from policy_engine.errors import EvaluationError
from policy_engine.language.contexts import MessageType

# Ints within this bound convert to double exactly, so Python's exact int-float comparison
# agrees with CEL's conversion to double.
_EXACT_DOUBLE: Final = 2**53
SCALARS: Final = frozenset({"int", "double", "string", "bool", "null"})
_ORDERED_KINDS: Final = frozenset({"int", "double", "string", "bool"})
COMPARISONS: Final[Mapping[str, tuple[str, Callable[[Any, Any], bool]]]] = {
    "relation_lt": ("<", operator.lt),
    "relation_le": ("<=", operator.le),
    "relation_gt": (">", operator.gt),
    "relation_ge": (">=", operator.ge),
}


class UnsupportedError(Exception):
    """The source leaves the subset; the caller keeps the CEL program."""


@dataclass(frozen=True, slots=True)
class Node:
    """A compiled sub-expression with what is known of it before it runs.

    ``kind`` is the CEL type as :mod:`policy_engine.language.contexts` spells it (``string``,
    ``list<string>``, ``map<string,dyn>``, ``dyn``), or ``null`` or ``message``. ``path`` is
    set when the value is a chain of subscripts from the activation, which callers fuse into
    one closure; ``constant`` holds a literal's value when ``is_constant``.
    """

    run: Evaluator
    kind: str
    message: MessageType | None = None
    path: tuple[str, ...] | None = None
    is_constant: bool = False
    constant: Any = None


def literal_node(value: Any, kind: str) -> Node:
    return Node(lambda _: value, kind, is_constant=True, constant=value)


def base_kind(kind: str) -> str:
    return kind.split("<", 1)[0]


def element_kind(kind: str) -> str:
    """``T`` of ``list<T>`` or ``map<string,T>``."""
    try:
        holder = container(kind)
    except ValueError:  # a map whose keys are not strings
        raise UnsupportedError from None
    if holder is None:
        raise UnsupportedError
    return holder[1]


def check_kind(kind: str) -> None:
    base = base_kind(kind)
    if base in ("list", "map"):
        check_kind(element_kind(kind))
    elif base not in ("string", "int", "bool", "double", "dyn"):
        raise UnsupportedError


def path_reader(path: tuple[str, ...]) -> Evaluator:
    """Subscripts from the activation; a KeyError or TypeError on the way is a CEL error."""
    if len(path) == 1:
        (first,) = path
        return lambda a: a[first]
    if len(path) == 2:
        first, second = path
        return lambda a: a[first][second]
    if len(path) == 3:
        first, second, third = path
        return lambda a: a[first][second][third]

    def read(a: Activation) -> Any:
        value: Any = a
        for key in path:
            value = value[key]
        return value

    return read


def selection(receiver: Node, name: str, kind: str) -> Node:
    """``x.name`` and ``x["name"]``: subscripting a dict, and only a dict, succeeds.

    Every JSON value but a dict raises KeyError or TypeError on ``value["name"]``, the
    errors CEL reports as a missing key or a selection on a non-map.
    """
    if receiver.path is not None:
        path = (*receiver.path, name)
        return Node(path_reader(path), kind, path=path)
    container = receiver.run
    return Node(lambda a: container(a)[name], kind)


def size_of(operand: Node) -> Node:
    value = operand.run
    if base_kind(operand.kind) in ("string", "list", "map"):
        return Node(lambda a: len(value(a)), "int")
    if operand.kind == "dyn":
        return Node(lambda a: values.length(value(a)), "int")
    raise UnsupportedError


def logical(left: Node, right: Node, *, conjunction: bool) -> Node:
    if left.kind not in ("bool", "dyn") or right.kind not in ("bool", "dyn"):
        raise UnsupportedError
    first, second = left.run, right.run
    if left.kind == right.kind == "bool":
        return Node(_and(first, second) if conjunction else _or(first, second), "bool")
    decide = _and_any if conjunction else _or_any
    return Node(lambda a: decide(first, second, a), "bool")


def _and(first: Evaluator, second: Evaluator) -> Evaluator:
    def conjunction(a: Activation) -> Any:
        try:
            if not first(a):
                return False
        except Exception:
            if second(a) is False:
                return False
            raise
        return second(a)

    return conjunction


def _or(first: Evaluator, second: Evaluator) -> Evaluator:
    def disjunction(a: Activation) -> Any:
        try:
            if first(a):
                return True
        except Exception:
            if second(a) is True:
                return True
            raise
        return second(a)

    return disjunction


def _and_any(first: Evaluator, second: Evaluator, a: Activation) -> bool:
    """``&&`` on operands that may not be bools: false wins, then any failure."""
    try:
        left = first(a)
    except Exception:
        if second(a) is False:
            return False
        raise
    if left is False:
        return False
    right = second(a)
    if right is False:
        return False
    if left is True and right is True:
        return True
    raise EvaluationError("no matching overload for '&&'")


def _or_any(first: Evaluator, second: Evaluator, a: Activation) -> bool:
    """``||`` on operands that may not be bools: true wins, then any failure."""
    try:
        left = first(a)
    except Exception:
        if second(a) is True:
            return True
        raise
    if left is True:
        return True
    right = second(a)
    if right is True:
        return True
    if left is False and right is False:
        return False
    raise EvaluationError("no matching overload for '||'")


def equality(left: Node, right: Node) -> Evaluator:
    if right.is_constant and not left.is_constant:
        left, right = right, left
    first, second = left.run, right.run
    if left.is_constant and not right.is_constant:
        test = _equal_to(left.constant, left.kind, right.kind)
        path = right.path
        if path is not None and len(path) == 2:
            outer, inner = path
            return lambda a: test(a[outer][inner])
        return lambda a: test(second(a))
    if left.kind == right.kind and left.kind in SCALARS:
        return lambda a: first(a) == second(a)
    return lambda a: values.equal(first(a), second(a))


def _equal_to(constant: Any, kind: str, other: str) -> Callable[[Any], bool]:
    """A test against a literal, as cheap as the other side's declared type allows."""
    if kind in ("bool", "null"):
        return partial(operator.is_, constant)
    if kind == "string" or (kind == other and kind in SCALARS):
        # A str equals no other JSON value in Python either; typed operands share the type.
        return partial(operator.eq, constant)
    if kind == "int" and abs(constant) <= _EXACT_DOUBLE:
        return partial(_equals_small_int, constant)
    return partial(values.equal, constant)


def _equals_small_int(constant: int, value: Any) -> bool:
    return bool(value == constant) and type(value) is not bool


def membership(needle: Node, container: Node) -> Evaluator:
    value, items = needle.run, container.run
    base, element = base_kind(container.kind), "dyn"
    if base in ("list", "map"):
        element = element_kind(container.kind)
    elif base != "dyn":
        raise UnsupportedError
    if container.is_constant:
        literals = container.constant
        if element in ("string", "int") and needle.kind == element:
            members = frozenset(literals)
            return lambda a: value(a) in members
        if element == "string":
            strings = frozenset(literals)
            return lambda a: values.in_strings(value(a), strings)
        return lambda a: values.in_list(value(a), literals)
    if base == "list" and element in ("string", "int") and needle.kind == element:
        return lambda a: value(a) in items(a)
    if base == "map" and needle.kind == "string":
        return lambda a: value(a) in items(a)
    return lambda a: values.contains(value(a), items(a))


def ordering(
    left: Node, right: Node, symbol: str, compare: Callable[[Any, Any], bool]
) -> Evaluator:
    first, second = left.run, right.run
    if left.kind == right.kind and left.kind in _ORDERED_KINDS:
        if right.is_constant:
            constant, path = right.constant, left.path
            if path is not None and len(path) == 2:
                outer, inner = path
                return lambda a: compare(a[outer][inner], constant)
            return lambda a: compare(first(a), constant)
        return lambda a: compare(first(a), second(a))
    if "dyn" not in (left.kind, right.kind):
        raise UnsupportedError
    return lambda a: values.order(symbol, compare, first(a), second(a))


def finish(node: Node, expect: str) -> Evaluator | None:
    run = node.run
    if node.kind == "message":
        return None
    if expect == "dyn" or base_kind(node.kind) == expect:
        checked = None
    elif node.kind == "dyn":
        checked = RESULT_TYPES[expect]
    else:
        return None  # the checker refuses this; refuse rather than guess

    if checked is None:

        def evaluate(a: Activation) -> Any:
            try:
                return run(a)
            except EvaluationError:
                raise
            except Exception as exc:
                raise EvaluationError(values.describe(exc)) from exc

        return evaluate

    def evaluate_checked(a: Activation) -> Any:
        try:
            value = run(a)
        except EvaluationError:
            raise
        except Exception as exc:
            raise EvaluationError(values.describe(exc)) from exc
        if type(value) is checked:
            return value
        raise EvaluationError(
            f"the expression returned {article(label(value))}, not {article(expect)}"
        )

    return evaluate_checked
