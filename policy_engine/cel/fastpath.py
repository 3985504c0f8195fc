"""Common CEL conditions as Python closures, with exactly cel-expr-python's answers.

A cel-expr-python evaluation converts the context dicts into CEL values every time, which
dominates the cost of the short conditions most policies hold; plain Python reads and
compares a few typed fields far more cheaply. :func:`compile_fast` turns such a source
into a closure over the activation, or returns None when the source leaves the subset,
and the caller keeps the CEL program.

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

from collections.abc import Callable, Mapping
from typing import Any, Final

from lark import Token, Tree
from lark.tree import Branch

from policy_engine.cel import values
from policy_engine.cel.checks import RESULT_TYPES, CelCompileError
from policy_engine.cel.closures import (
    COMPARISONS,
    SCALARS,
    Node,
    UnsupportedError,
    base_kind,
    check_kind,
    element_kind,
    equality,
    finish,
    literal_node,
    logical,
    membership,
    ordering,
    path_reader,
    selection,
    size_of,
)
from policy_engine.cel.literals import INT64_MIN, int_value, string_value
from policy_engine.cel.tree import WRAPPERS, arguments, bare, parse
from policy_engine.cel.values import Evaluator
from policy_engine.language.contexts import MessageType, Variable

_UINT64_END: Final = 2**64
_STRING_METHODS: Final[Mapping[str, Callable[[str, str], bool]]] = {
    "startsWith": str.startswith,
    "endsWith": str.endswith,
    "contains": str.__contains__,
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
    if expect != "dyn" and expect not in RESULT_TYPES:
        raise ValueError(f"expect must be bool, int, string or dyn, not {expect!r}")
    try:
        node = _Compiler(variables).visit(parse(source))
    except (UnsupportedError, CelCompileError, RecursionError):
        return None
    return finish(node, expect)


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
            if not INT64_MIN <= item < _UINT64_END:
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


class _Compiler:
    """One pass over celpy's parse tree, building closures bottom up."""

    def __init__(self, variables: Mapping[str, Variable]) -> None:
        self.variables = variables

    def visit(self, branch: Branch[Token]) -> Node:
        node = _tree(branch)
        if node.data in WRAPPERS and len(node.children) == 1 and node.data != "unary":
            return self.visit(node.children[0])
        handler: Callable[[Tree[Token]], Node] | None = getattr(self, f"_on_{node.data}", None)
        if handler is None:
            raise UnsupportedError
        return handler(node)

    # literals and names

    def _on_literal(self, node: Tree[Token]) -> Node:
        literal = node.children[0]
        if not isinstance(literal, Token):
            raise UnsupportedError
        text = str(literal)
        value: Any
        if literal.type == "INT_LIT":
            value = int_value(text)
            kind = "int"
        elif literal.type == "FLOAT_LIT":
            value = float(text)
            if value in (float("inf"), float("-inf")):
                raise UnsupportedError
            kind = "double"
        elif literal.type in ("STRING_LIT", "MLSTRING_LIT"):
            value = string_value(literal)
            kind = "string"
        elif literal.type == "BOOL_LIT":
            return literal_node(text == "true", "bool")
        elif literal.type == "NULL_LIT":
            return literal_node(None, "null")
        else:
            raise UnsupportedError  # uint and bytes literals
        if value is None:
            raise UnsupportedError  # a literal the two parsers might read differently
        return literal_node(value, kind)

    def _on_list_lit(self, node: Tree[Token]) -> Node:
        elements = [self.visit(element) for element in arguments(node, 0)]
        if not all(e.is_constant and e.kind in SCALARS for e in elements):
            raise UnsupportedError
        kinds = {e.kind for e in elements}
        kind = f"list<{kinds.pop()}>" if len(kinds) == 1 else "list<dyn>"
        return literal_node([e.constant for e in elements], kind)

    def _on_paren_expr(self, node: Tree[Token]) -> Node:
        return self.visit(node.children[0])

    def _on_ident(self, node: Tree[Token]) -> Node:
        name = str(node.children[0])
        variable = self.variables.get(name)
        if variable is None:
            raise UnsupportedError
        path = (name,)
        if isinstance(variable, MessageType):
            return Node(path_reader(path), "message", message=variable, path=path)
        check_kind(variable)
        return Node(path_reader(path), variable, path=path)

    def _on_member_dot(self, node: Tree[Token]) -> Node:
        receiver = self.visit(node.children[0])
        name = str(node.children[1])
        return selection(receiver, name, self._field_kind(receiver, name))

    def _field_kind(self, receiver: Node, name: str) -> str:
        if receiver.message is not None:
            kind = receiver.message.fields.get(name)
            if kind is None:
                raise UnsupportedError
            check_kind(kind)
            return kind
        if receiver.kind == "dyn":
            return "dyn"
        if base_kind(receiver.kind) == "map":
            return element_kind(receiver.kind)
        raise UnsupportedError

    def _on_member_index(self, node: Tree[Token]) -> Node:
        receiver = self.visit(node.children[0])
        key = self.visit(node.children[1])
        base = base_kind(receiver.kind)
        if key.kind == "string" and base in ("map", "dyn"):
            kind = "dyn" if base == "dyn" else element_kind(receiver.kind)
            if key.is_constant:
                return selection(receiver, key.constant, kind)
            container, index = receiver.run, key.run
            return Node(lambda a: container(a)[index(a)], kind)
        if key.kind == "int" and base in ("list", "dyn"):
            container, index = receiver.run, key.run
            kind = "dyn" if base == "dyn" else element_kind(receiver.kind)
            return Node(lambda a: values.item(container(a), index(a)), kind)
        raise UnsupportedError

    # calls

    def _on_ident_arg(self, node: Tree[Token]) -> Node:
        name = str(node.children[0])
        args = arguments(node, 1)
        if len(args) != 1:
            raise UnsupportedError
        if name == "has":
            return self._has(args[0])
        if name == "size":
            return size_of(self.visit(args[0]))
        raise UnsupportedError

    def _on_member_dot_arg(self, node: Tree[Token]) -> Node:
        name = str(node.children[1])
        args = arguments(node, 2)
        if name == "size" and not args:
            return size_of(self.visit(node.children[0]))
        method = _STRING_METHODS.get(name)
        if method is None or len(args) != 1:
            raise UnsupportedError
        receiver, argument = self.visit(node.children[0]), self.visit(args[0])
        if receiver.kind not in ("string", "dyn") or argument.kind not in ("string", "dyn"):
            raise UnsupportedError
        text, part = receiver.run, argument.run
        if receiver.kind == argument.kind == "string":
            return Node(lambda a: method(text(a), part(a)), "bool")
        return Node(lambda a: values.string_call(name, method, text(a), part(a)), "bool")

    def _has(self, argument: Branch[Token]) -> Node:
        target = _tree(bare(argument))
        if target.data != "member_dot":
            raise UnsupportedError  # the checker allows only a selection, unparenthesised
        receiver = self.visit(target.children[0])
        name = str(target.children[1])
        self._field_kind(receiver, name)
        container = receiver.run
        if receiver.kind == "dyn":
            return Node(lambda a: values.has_key(container(a), name), "bool")
        path = receiver.path
        if path is not None and len(path) == 1:
            (variable,) = path
            return Node(lambda a: name in a[variable], "bool")
        return Node(lambda a: name in container(a), "bool")

    # operators

    def _on_unary(self, node: Tree[Token]) -> Node:
        if len(node.children) == 1:
            return self.visit(node.children[0])
        negations = 0
        current: Tree[Token] = node
        # The C++ parser drops pairs of consecutive `!`, so `!!x` is `x` whatever x holds.
        while len(current.children) == 2:
            operator_node, operand = current.children
            if _tree(operator_node).data != "unary_not":
                raise UnsupportedError  # negation is arithmetic
            negations += 1
            current = _tree(operand)
        inner = self.visit(current)
        if negations % 2 == 0:
            return inner
        value = inner.run
        if inner.kind == "bool":
            return Node(lambda a: not value(a), "bool")
        if inner.kind != "dyn":
            raise UnsupportedError
        return Node(lambda a: values.negate(value(a)), "bool")

    def _on_conditionaland(self, node: Tree[Token]) -> Node:
        left, right = self.visit(node.children[0]), self.visit(node.children[1])
        return logical(left, right, conjunction=True)

    def _on_conditionalor(self, node: Tree[Token]) -> Node:
        left, right = self.visit(node.children[0]), self.visit(node.children[1])
        return logical(left, right, conjunction=False)

    def _on_expr(self, node: Tree[Token]) -> Node:
        condition, then, otherwise = (self.visit(child) for child in node.children)
        if condition.kind not in ("bool", "dyn"):
            raise UnsupportedError
        if then.kind == otherwise.kind:
            kind = then.kind
        elif "dyn" in (then.kind, otherwise.kind):
            kind = "dyn"
        else:
            raise UnsupportedError
        if kind == "message":
            raise UnsupportedError
        test, first, second = condition.run, then.run, otherwise.run
        if condition.kind == "bool":
            return Node(lambda a: first(a) if test(a) else second(a), kind)
        return Node(lambda a: values.choose(test(a), first, second, a), kind)

    def _on_relation(self, node: Tree[Token]) -> Node:
        operation = _tree(node.children[0])
        left, right = self.visit(operation.children[0]), self.visit(node.children[1])
        if "message" in (left.kind, right.kind):
            raise UnsupportedError
        if operation.data == "relation_eq":
            return Node(equality(left, right), "bool")
        if operation.data == "relation_ne":
            equal = equality(left, right)
            return Node(lambda a: not equal(a), "bool")
        if operation.data == "relation_in":
            return Node(membership(left, right), "bool")
        symbol, compare = COMPARISONS[operation.data]
        return Node(ordering(left, right, symbol, compare), "bool")

    def _on_addition(self, node: Tree[Token]) -> Node:
        operation = _tree(node.children[0])
        if operation.data != "addition_add":
            raise UnsupportedError
        left, right = self.visit(operation.children[0]), self.visit(node.children[1])
        kinds = {left.kind, right.kind}
        if "string" not in kinds or not kinds <= {"string", "dyn"}:
            raise UnsupportedError  # arithmetic, or list concatenation
        first, second = left.run, right.run
        if kinds == {"string"}:
            if right.is_constant:
                suffix: str = right.constant
                return Node(lambda a: first(a) + suffix, "string")
            if left.is_constant:
                prefix: str = left.constant
                return Node(lambda a: prefix + second(a), "string")
            return Node(lambda a: first(a) + second(a), "string")
        return Node(lambda a: values.text(first(a)) + values.text(second(a)), "string")


def _tree(branch: Branch[Token]) -> Tree[Token]:
    if not isinstance(branch, Tree):
        raise UnsupportedError
    return branch
