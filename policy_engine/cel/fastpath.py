"""Common CEL conditions as Python closures: cel-expr-python's answers at a fraction of the cost.

At roughly 85 us of server CPU per Socket.IO event, every microsecond of policy work costs
about one percent of throughput, and a cel-expr-python evaluation costs 3-4 us even for
``has(claims.role) && claims.role == "viewer"``: converting the context dicts into CEL values
dominates. Most conditions are a few comparisons over typed fields, which plain Python
reads and compares in a few hundred nanoseconds. :func:`compile_fast` turns such a source
into a closure over the activation, or returns None when the source leaves the subset, and
the caller keeps the CEL program.

The subset: literals (string, int, double, bool, null; lists of them), reading variables and
fields (``conn.ip``, ``claims.org.id``, ``m["k"]``, ``l[0]``), ``has()``, ``==`` ``!=`` ``<``
``<=`` ``>`` ``>=``, ``in`` (a list literal, a list or a map), ``&&`` ``||`` ``!`` with CEL's
commutative error rules, ``?:``, string ``+``, ``size()``, ``startsWith``, ``endsWith`` and
``contains``. No arithmetic, macros, ``matches``, conversions, timestamps, map literals.

Exactness is the point, so the closures reproduce what cel-expr-python 0.1.3 does on plain
dicts, surprises included (each is pinned in the tests):

* equality is heterogeneous: ``1 == 1.0`` is true, ``1 == true`` and ``1 == "1"`` are false,
  never an error; lists and maps compare element by element, so ``[nan] == [nan]`` is false;
* an int meets a double as a double: ``9007199254740993 == 9007199254740992.0`` is true;
  ints of 2**63 and more are uints and compare exactly with ints;
* ordering works within numbers, strings, bools; anything else is an error;
* ``false && error`` is false and ``true || error`` true from either side; a non-bool operand
  counts as an error;
* ``!!x`` is ``x`` (the parser drops pairs of ``!``), but ``!(!x)`` is not;
* a map key that is absent, an index out of range, selecting a field of a non-map, and an
  operand of the wrong type are errors.

The closures rely on the declared types of message fields (``conn.ip`` is a str); ``dyn``
values (``claims``, ``event.payload``) are classified at run time. They are exact on plain
JSON data (see :func:`fits_fast_path`). Outside it the C++ engine differs in two ways the
closures do not copy. It converts a whole variable when the expression first reads it and
fails when any value in it does not convert (an int of 2**64, a lone surrogate, a tuple):
then every expression reading ``event`` fails, even ``event.name == "x"``, where a closure
fails only when it touches such a value. And it cuts strings at their first NUL, in keys
too: it reads ``{"role": "admin\\x00x"}`` as ``{"role": "admin"}``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, NoReturn

from lark import Token, Tree
from lark.exceptions import LarkError
from lark.tree import Branch

from policy_engine.cel.grammar import parser
from policy_engine.errors import EvaluationError
from policy_engine.language.contexts import MessageType, Variable

Activation = Mapping[str, Any]
Evaluator = Callable[[Activation], Any]

_INT64_MIN: Final = -(2**63)
_UINT64_END: Final = 2**64
# Ints within this bound convert to double exactly, so Python's exact int-float comparison
# agrees with CEL's conversion to double.
_EXACT_DOUBLE: Final = 2**53
_RESULT_TYPES: Final[Mapping[str, type]] = {"bool": bool, "int": int, "string": str}
_LABELS: Final[Mapping[type, str]] = {
    bool: "bool",
    int: "int",
    float: "double",
    str: "string",
    list: "list",
    dict: "map",
    type(None): "null",
}
_NUMBERS: Final = frozenset({int, float})
_ORDERED: Final = frozenset({int, float, str, bool})
_SCALARS: Final = frozenset({"int", "double", "string", "bool", "null"})
_ORDERED_KINDS: Final = frozenset({"int", "double", "string", "bool"})
_COMPARISONS: Final[Mapping[str, tuple[str, Callable[[Any, Any], bool]]]] = {
    "relation_lt": ("<", operator.lt),
    "relation_le": ("<=", operator.le),
    "relation_gt": (">", operator.gt),
    "relation_ge": (">=", operator.ge),
}
_STRING_METHODS: Final[Mapping[str, Callable[[str, str], bool]]] = {
    "startsWith": str.startswith,
    "endsWith": str.endswith,
    "contains": str.__contains__,
}
_WRAPPERS: Final = frozenset(
    {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication"}
    | {"unary", "member", "primary"}
)
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


def compile_fast(
    source: str, variables: Mapping[str, Variable], *, expect: str
) -> Evaluator | None:
    """A closure giving cel-expr-python's result for ``source``, or None outside the subset.

    ``source`` must already have passed the CEL type checker against ``variables``. The
    closure takes the activation (variable name to plain value), returns the plain result
    and raises :class:`EvaluationError` wherever cel-expr-python's evaluation fails,
    including a ``dyn`` result that is not of the ``expect``-ed type.
    """
    if expect != "dyn" and expect not in _RESULT_TYPES:
        raise ValueError(f"expect must be bool, int, string or dyn, not {expect!r}")
    try:
        node = _Compiler(variables).visit(parser(positions=False).parse(source))
    except (_UnsupportedError, LarkError, RecursionError):
        return None
    return _finish(node, expect)


def fits_fast_path(value: object) -> bool:
    """Whether ``value`` is plain JSON data, where the closures are exact.

    That is dicts with str keys, lists, str without NUL or lone surrogates, ints in
    [-2**63, 2**64), floats, bools and None. cel-expr-python accepts a little more (bytes,
    int keys, ``OrderedDict``), and outside what it accepts it fails every read of the
    variable holding the value. Checking claims once per connection and payloads once per
    event keeps both engines in agreement.
    """
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is dict:
            for key, member in item.items():
                if type(key) is not str or not _plain_text(key):
                    return False
                pending.append(member)
        elif kind is list:
            pending.extend(item)
        elif kind is str:
            if not _plain_text(item):
                return False
        elif kind is int:
            if not _INT64_MIN <= item < _UINT64_END:
                return False
        elif kind not in (float, bool, type(None)):
            return False
    return True


def _plain_text(text: str) -> bool:
    """cel-expr-python cuts a str at its first NUL and cannot encode a lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# --- the parse tree --------------------------------------------------------------------------


class _UnsupportedError(Exception):
    """The source leaves the subset; the caller keeps the CEL program."""


@dataclass(frozen=True, slots=True)
class _Node:
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


def _constant(value: Any, kind: str) -> _Node:
    return _Node(lambda _: value, kind, is_constant=True, constant=value)


def _base(kind: str) -> str:
    return kind.split("<", 1)[0]


def _element(kind: str) -> str:
    """``T`` of ``list<T>`` or ``map<string,T>``."""
    inner = kind[kind.index("<") + 1 : -1]
    if kind.startswith("map<"):
        key, _, inner = inner.partition(",")
        if key.strip() != "string":
            raise _UnsupportedError
    return inner.strip()


def _arguments(node: Tree[Token], index: int) -> list[Branch[Token]]:
    if len(node.children) > index and isinstance(arguments := node.children[index], Tree):
        return list(arguments.children)
    return []


def _tree(branch: Branch[Token]) -> Tree[Token]:
    if not isinstance(branch, Tree):
        raise _UnsupportedError
    return branch


def _bare(branch: Branch[Token]) -> Tree[Token]:
    """The operation under single-child grammar levels, stopping at parentheses."""
    node = _tree(branch)
    while node.data in _WRAPPERS and len(node.children) == 1:
        node = _tree(node.children[0])
    return node


# --- compiling -------------------------------------------------------------------------------


class _Compiler:
    """One pass over celpy's parse tree, building closures bottom up."""

    def __init__(self, variables: Mapping[str, Variable]) -> None:
        self.variables = variables

    def visit(self, branch: Branch[Token]) -> _Node:
        node = _tree(branch)
        if node.data in _WRAPPERS and len(node.children) == 1 and node.data != "unary":
            return self.visit(node.children[0])
        handler: Callable[[Tree[Token]], _Node] | None = getattr(self, f"_on_{node.data}", None)
        if handler is None:
            raise _UnsupportedError
        return handler(node)

    # literals and names

    def _on_literal(self, node: Tree[Token]) -> _Node:
        token = node.children[0]
        if not isinstance(token, Token):
            raise _UnsupportedError
        text = str(token)
        if token.type == "INT_LIT":
            return _constant(_int_literal(text), "int")
        if token.type == "FLOAT_LIT":
            value = float(text)
            if value in (float("inf"), float("-inf")):
                raise _UnsupportedError
            return _constant(value, "double")
        if token.type in ("STRING_LIT", "MLSTRING_LIT"):
            return _constant(_string_literal(text), "string")
        if token.type == "BOOL_LIT":
            return _constant(text == "true", "bool")
        if token.type == "NULL_LIT":
            return _constant(None, "null")
        raise _UnsupportedError  # uint and bytes literals

    def _on_list_lit(self, node: Tree[Token]) -> _Node:
        elements = [self.visit(element) for element in _arguments(node, 0)]
        if not all(e.is_constant and e.kind in _SCALARS for e in elements):
            raise _UnsupportedError
        kinds = {e.kind for e in elements}
        kind = f"list<{kinds.pop()}>" if len(kinds) == 1 else "list<dyn>"
        return _constant([e.constant for e in elements], kind)

    def _on_paren_expr(self, node: Tree[Token]) -> _Node:
        return self.visit(node.children[0])

    def _on_ident(self, node: Tree[Token]) -> _Node:
        name = str(node.children[0])
        variable = self.variables.get(name)
        if variable is None:
            raise _UnsupportedError
        path = (name,)
        if isinstance(variable, MessageType):
            return _Node(_reader(path), "message", message=variable, path=path)
        _check_kind(variable)
        return _Node(_reader(path), variable, path=path)

    def _on_member_dot(self, node: Tree[Token]) -> _Node:
        receiver = self.visit(node.children[0])
        name = str(node.children[1])
        return _select(receiver, name, self._field_kind(receiver, name))

    def _field_kind(self, receiver: _Node, name: str) -> str:
        if receiver.message is not None:
            kind = receiver.message.fields.get(name)
            if kind is None:
                raise _UnsupportedError
            _check_kind(kind)
            return kind
        if receiver.kind == "dyn":
            return "dyn"
        if _base(receiver.kind) == "map":
            return _element(receiver.kind)
        raise _UnsupportedError

    def _on_member_index(self, node: Tree[Token]) -> _Node:
        receiver = self.visit(node.children[0])
        key = self.visit(node.children[1])
        base = _base(receiver.kind)
        if key.kind == "string" and base in ("map", "dyn"):
            kind = "dyn" if base == "dyn" else _element(receiver.kind)
            if key.is_constant:
                return _select(receiver, key.constant, kind)
            container, index = receiver.run, key.run
            return _Node(lambda a: container(a)[index(a)], kind)
        if key.kind == "int" and base in ("list", "dyn"):
            container, index = receiver.run, key.run
            kind = "dyn" if base == "dyn" else _element(receiver.kind)
            return _Node(lambda a: _item(container(a), index(a)), kind)
        raise _UnsupportedError

    # calls

    def _on_ident_arg(self, node: Tree[Token]) -> _Node:
        name = str(node.children[0])
        arguments = _arguments(node, 1)
        if len(arguments) != 1:
            raise _UnsupportedError
        if name == "has":
            return self._has(arguments[0])
        if name == "size":
            return _size(self.visit(arguments[0]))
        raise _UnsupportedError

    def _on_member_dot_arg(self, node: Tree[Token]) -> _Node:
        name = str(node.children[1])
        arguments = _arguments(node, 2)
        if name == "size" and not arguments:
            return _size(self.visit(node.children[0]))
        method = _STRING_METHODS.get(name)
        if method is None or len(arguments) != 1:
            raise _UnsupportedError
        receiver, argument = self.visit(node.children[0]), self.visit(arguments[0])
        if receiver.kind not in ("string", "dyn") or argument.kind not in ("string", "dyn"):
            raise _UnsupportedError
        text, part = receiver.run, argument.run
        if receiver.kind == argument.kind == "string":
            return _Node(lambda a: method(text(a), part(a)), "bool")
        return _Node(lambda a: _string_call(name, method, text(a), part(a)), "bool")

    def _has(self, argument: Branch[Token]) -> _Node:
        target = _bare(argument)
        if target.data != "member_dot":
            raise _UnsupportedError  # the checker allows only a selection, unparenthesised
        receiver = self.visit(target.children[0])
        name = str(target.children[1])
        self._field_kind(receiver, name)
        container = receiver.run
        if receiver.kind == "dyn":
            return _Node(lambda a: _has_key(container(a), name), "bool")
        path = receiver.path
        if path is not None and len(path) == 1:
            (variable,) = path
            return _Node(lambda a: name in a[variable], "bool")
        return _Node(lambda a: name in container(a), "bool")

    # operators

    def _on_unary(self, node: Tree[Token]) -> _Node:
        if len(node.children) == 1:
            return self.visit(node.children[0])
        negations = 0
        current: Tree[Token] = node
        # The C++ parser drops pairs of consecutive `!`, so `!!x` is `x` whatever x holds.
        while len(current.children) == 2:
            operator_node, operand = current.children
            if _tree(operator_node).data != "unary_not":
                raise _UnsupportedError  # negation is arithmetic
            negations += 1
            current = _tree(operand)
        inner = self.visit(current)
        if negations % 2 == 0:
            return inner
        value = inner.run
        if inner.kind == "bool":
            return _Node(lambda a: not value(a), "bool")
        if inner.kind != "dyn":
            raise _UnsupportedError
        return _Node(lambda a: _negate(value(a)), "bool")

    def _on_conditionaland(self, node: Tree[Token]) -> _Node:
        left, right = self.visit(node.children[0]), self.visit(node.children[1])
        return _logical(left, right, conjunction=True)

    def _on_conditionalor(self, node: Tree[Token]) -> _Node:
        left, right = self.visit(node.children[0]), self.visit(node.children[1])
        return _logical(left, right, conjunction=False)

    def _on_expr(self, node: Tree[Token]) -> _Node:
        condition, then, otherwise = (self.visit(child) for child in node.children)
        if condition.kind not in ("bool", "dyn"):
            raise _UnsupportedError
        if then.kind == otherwise.kind:
            kind = then.kind
        elif "dyn" in (then.kind, otherwise.kind):
            kind = "dyn"
        else:
            raise _UnsupportedError
        if kind == "message":
            raise _UnsupportedError
        test, first, second = condition.run, then.run, otherwise.run
        if condition.kind == "bool":
            return _Node(lambda a: first(a) if test(a) else second(a), kind)
        return _Node(lambda a: _choose(test(a), first, second, a), kind)

    def _on_relation(self, node: Tree[Token]) -> _Node:
        operation = _tree(node.children[0])
        left, right = self.visit(operation.children[0]), self.visit(node.children[1])
        if "message" in (left.kind, right.kind):
            raise _UnsupportedError
        if operation.data == "relation_eq":
            return _Node(_equality(left, right), "bool")
        if operation.data == "relation_ne":
            equal = _equality(left, right)
            return _Node(lambda a: not equal(a), "bool")
        if operation.data == "relation_in":
            return _Node(_membership(left, right), "bool")
        symbol, compare = _COMPARISONS[operation.data]
        return _Node(_ordering(left, right, symbol, compare), "bool")

    def _on_addition(self, node: Tree[Token]) -> _Node:
        operation = _tree(node.children[0])
        if operation.data != "addition_add":
            raise _UnsupportedError
        left, right = self.visit(operation.children[0]), self.visit(node.children[1])
        kinds = {left.kind, right.kind}
        if "string" not in kinds or not kinds <= {"string", "dyn"}:
            raise _UnsupportedError  # arithmetic, or list concatenation
        first, second = left.run, right.run
        if kinds == {"string"}:
            if right.is_constant:
                suffix: str = right.constant
                return _Node(lambda a: first(a) + suffix, "string")
            if left.is_constant:
                prefix: str = left.constant
                return _Node(lambda a: prefix + second(a), "string")
            return _Node(lambda a: first(a) + second(a), "string")
        return _Node(lambda a: _text(first(a)) + _text(second(a)), "string")


def _check_kind(kind: str) -> None:
    base = _base(kind)
    if base in ("list", "map"):
        _check_kind(_element(kind))
    elif base not in ("string", "int", "bool", "double", "dyn"):
        raise _UnsupportedError


def _int_literal(text: str) -> int:
    if not _INT_LITERAL.fullmatch(text):
        raise _UnsupportedError
    value = int(text, 16) if "x" in text else int(text)
    if not _INT64_MIN <= value < -_INT64_MIN:
        raise _UnsupportedError
    return value


def _string_literal(text: str) -> str:
    """A string literal's value, for the escapes cel-expr-python is known to read this way."""
    raw = text[:1] in "rR"
    body = text[1:] if raw else text
    quote = 3 if body[:3] in ('"""', "'''") else 1
    content = body[quote:-quote]
    if "\r" in content:
        raise _UnsupportedError  # the C++ parser normalises line ends
    if raw:
        return content
    if not _COOKED.fullmatch(content):
        raise _UnsupportedError
    return _ESCAPE.sub(_unescape, content)


def _unescape(match: re.Match[str]) -> str:
    escape = match.group()[1:]
    if escape[0] in "xuU":
        code = int(escape[1:], 16)
    elif escape[0].isdigit():
        code = int(escape, 8)
    else:
        return _SIMPLE_ESCAPES[escape]
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        raise _UnsupportedError
    return chr(code)


# --- building closures -----------------------------------------------------------------------


def _reader(path: tuple[str, ...]) -> Evaluator:
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


def _select(receiver: _Node, name: str, kind: str) -> _Node:
    """``x.name`` and ``x["name"]``: subscripting a dict, and only a dict, succeeds.

    Every JSON value but a dict raises KeyError or TypeError on ``value["name"]``, the
    errors CEL reports as a missing key or a selection on a non-map.
    """
    if receiver.path is not None:
        path = (*receiver.path, name)
        return _Node(_reader(path), kind, path=path)
    container = receiver.run
    return _Node(lambda a: container(a)[name], kind)


def _size(operand: _Node) -> _Node:
    value = operand.run
    if _base(operand.kind) in ("string", "list", "map"):
        return _Node(lambda a: len(value(a)), "int")
    if operand.kind == "dyn":
        return _Node(lambda a: _length(value(a)), "int")
    raise _UnsupportedError


def _logical(left: _Node, right: _Node, *, conjunction: bool) -> _Node:
    if left.kind not in ("bool", "dyn") or right.kind not in ("bool", "dyn"):
        raise _UnsupportedError
    first, second = left.run, right.run
    if left.kind == right.kind == "bool":
        return _Node(_and(first, second) if conjunction else _or(first, second), "bool")
    decide = _and_any if conjunction else _or_any
    return _Node(lambda a: decide(first, second, a), "bool")


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


def _equality(left: _Node, right: _Node) -> Evaluator:
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
    if left.kind == right.kind and left.kind in _SCALARS:
        return lambda a: first(a) == second(a)
    return lambda a: _equal(first(a), second(a))


def _equal_to(constant: Any, kind: str, other: str) -> Callable[[Any], bool]:
    """A test against a literal, as cheap as the other side's declared type allows."""
    if kind in ("bool", "null"):
        return partial(operator.is_, constant)
    if kind == "string" or (kind == other and kind in _SCALARS):
        # A str equals no other JSON value in Python either; typed operands share the type.
        return partial(operator.eq, constant)
    if kind == "int" and abs(constant) <= _EXACT_DOUBLE:
        return partial(_equals_small_int, constant)
    return partial(_equal, constant)


def _equals_small_int(constant: int, value: Any) -> bool:
    return bool(value == constant) and type(value) is not bool


def _membership(needle: _Node, container: _Node) -> Evaluator:
    value, items = needle.run, container.run
    base, element = _base(container.kind), "dyn"
    if base in ("list", "map"):
        element = _element(container.kind)
    elif base != "dyn":
        raise _UnsupportedError
    if container.is_constant:
        literals = container.constant
        if element in ("string", "int") and needle.kind == element:
            members = frozenset(literals)
            return lambda a: value(a) in members
        if element == "string":
            strings = frozenset(literals)
            return lambda a: _in_strings(value(a), strings)
        return lambda a: _in_list(value(a), literals)
    if base == "list" and element in ("string", "int") and needle.kind == element:
        return lambda a: value(a) in items(a)
    if base == "map" and needle.kind == "string":
        return lambda a: value(a) in items(a)
    return lambda a: _contains(value(a), items(a))


def _ordering(
    left: _Node, right: _Node, symbol: str, compare: Callable[[Any, Any], bool]
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
        raise _UnsupportedError
    return lambda a: _order(symbol, compare, first(a), second(a))


def _finish(node: _Node, expect: str) -> Evaluator | None:
    run = node.run
    if node.kind == "message":
        return None
    if expect == "dyn" or _base(node.kind) == expect:
        checked = None
    elif node.kind == "dyn":
        checked = _RESULT_TYPES[expect]
    else:
        return None  # the checker refuses this; refuse rather than guess

    if checked is None:

        def evaluate(a: Activation) -> Any:
            try:
                return run(a)
            except EvaluationError:
                raise
            except Exception as exc:
                raise EvaluationError(_describe(exc)) from exc

        return evaluate

    def evaluate_checked(a: Activation) -> Any:
        try:
            value = run(a)
        except EvaluationError:
            raise
        except Exception as exc:
            raise EvaluationError(_describe(exc)) from exc
        if type(value) is checked:
            return value
        raise EvaluationError(f"the expression returned {_a(_label(value))}, not {_a(expect)}")

    return evaluate_checked


# --- CEL semantics on plain values -----------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise EvaluationError(message)


def _label(value: Any) -> str:
    return _LABELS.get(type(value), type(value).__name__)


def _a(word: str) -> str:
    return f"{'an' if word[:1] in tuple('aeio') else 'a'} {word}"


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no such key: {exc.args[0]!r}" if exc.args else "no such key"
    if isinstance(exc, TypeError):
        return f"no matching overload: {exc}"
    return str(exc) or type(exc).__name__


def _equal(left: Any, right: Any) -> bool:
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
        elif kind in _NUMBERS and other in _NUMBERS:
            if float(first) != float(second):
                return False
        else:
            return False
    return True


def _order(symbol: str, compare: Callable[[Any, Any], bool], left: Any, right: Any) -> bool:
    kind, other = type(left), type(right)
    if kind is other and kind in _ORDERED:
        return compare(left, right)
    if kind in _NUMBERS and other in _NUMBERS:
        return compare(float(left), float(right))
    _fail(f"no matching overload for '{symbol}' applied to ({_label(left)}, {_label(right)})")


def _in_strings(value: Any, strings: frozenset[str]) -> bool:
    return type(value) is str and value in strings


def _in_list(value: Any, items: Iterable[Any]) -> bool:
    return any(_equal(value, item) for item in items)


def _contains(value: Any, container: Any) -> bool:
    kind = type(container)
    if kind is list:
        return _in_list(value, container)
    if kind is dict:
        key_kind = type(value)
        if key_kind is str:
            return value in container
        if key_kind is bool:
            return any(type(key) is bool and key is value for key in container)
        if key_kind in _NUMBERS:
            # An int key matches a number equal to it; a double key cannot exist.
            return any(type(key) is int and key == value for key in container)
    _fail(f"no matching overload for 'in' applied to ({_label(value)}, {_label(container)})")


def _item(container: Any, index: int) -> Any:
    kind = type(container)
    if kind is list:
        if 0 <= index < len(container):
            return container[index]
        _fail(f"index {index} out of range for a list of {len(container)}")
    if kind is dict:
        for key, value in container.items():
            if type(key) is int and key == index:
                return value
        _fail(f"no such key: {index}")
    _fail(f"cannot index {_a(_label(container))}")


def _has_key(container: Any, name: str) -> bool:
    if type(container) is dict:
        return name in container
    _fail(f"has() on {_a(_label(container))}, not a map")


def _length(value: Any) -> int:
    if type(value) in (str, list, dict):
        return len(value)
    _fail(f"no matching overload for size({_label(value)})")


def _negate(value: Any) -> bool:
    if type(value) is bool:
        return not value
    _fail(f"no matching overload for '!' applied to {_a(_label(value))}")


def _choose(condition: Any, then: Evaluator, otherwise: Evaluator, a: Activation) -> Any:
    if condition is True:
        return then(a)
    if condition is False:
        return otherwise(a)
    _fail(f"the condition of '?:' is {_a(_label(condition))}, not a bool")


def _text(value: Any) -> str:
    if type(value) is str:
        return value
    _fail(f"no matching overload for '+' applied to {_a(_label(value))} and a string")


def _string_call(
    name: str, method: Callable[[str, str], bool], receiver: Any, argument: Any
) -> bool:
    if type(receiver) is str and type(argument) is str:
        return method(receiver, argument)
    _fail(f"no matching overload for ({_label(receiver)}).{name}({_label(argument)})")
