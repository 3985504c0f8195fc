"""The checker's walk: one pass over a parse tree, in the C++ engine's terms.

It finds an expression's result type when the tree shows it, and every problem both
engines must refuse alike (undeclared names and functions, unknown fields, bad regex
literals, comprehensions without a bound on their cost). The pure-Python engine
has no checker of its own and relies on it entirely; the C++ engine's checker finds the
rest of the type errors itself.

Cost model, in comprehension iterations (the unit both engines' run-time budget counts): a
comprehension over a list or map literal of n elements costs ``n * (1 + cost of its
body)``; over anything else its size is unknown until run time. A comprehension inside one
over such a runtime list has no bound and is refused; a static estimate above
``ITERATION_BUDGET`` would fail at run time and is refused too.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final

import celpy.evaluation
from lark import Token, Tree
from lark.tree import Branch

from policy_engine.cel.analysis import names_read
from policy_engine.cel.checks import (
    BAD_REGEX,
    CALL_KINDS,
    ITERATION_BUDGET,
    MACROS,
    SYNTAX,
    TOO_COMPLEX,
    CelCompileError,
    container,
    regex_problem,
    undeclared,
    undefined_field,
)
from policy_engine.cel.tree import (
    arguments,
    call_offset,
    check_shape,
    dot_offset,
    first_token,
    operands,
    parse,
    start,
    token,
    unwrap,
)
from policy_engine.language.contexts import MessageType, Variable

_PROBLEM_RANK: Final[Mapping[str, int]] = {BAD_REGEX: 1, TOO_COMPLEX: 2}
_LITERAL_KINDS: Final[Mapping[str, str]] = {
    "INT_LIT": "int",
    "UINT_LIT": "uint",
    "FLOAT_LIT": "double",
    "STRING_LIT": "string",
    "MLSTRING_LIT": "string",
    "BYTES_LIT": "bytes",
    "BOOL_LIT": "bool",
    "NULL_LIT": "null",
}
# Words CEL keeps for itself; celpy's grammar reads them as names.
_RESERVED: Final = frozenset(
    {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let"}
    | {"loop", "package", "namespace", "return", "var", "void", "while"}
)


@dataclass(frozen=True, slots=True)
class Analysis:
    """A checked tree: the variables it reads, its result type, its problems, worst first."""

    tree: Tree[Token]
    variables: frozenset[str]
    kind: str
    problems: tuple[CelCompileError, ...]

    def first(self, codes: Collection[str]) -> CelCompileError | None:
        return next((p for p in self.problems if p.code in codes), None)


def analyse(source: str, variables: Mapping[str, Variable]) -> Analysis:
    """Parse ``source`` (syntax and size errors raise) and walk it against ``variables``."""
    tree = parse(source)
    check_shape(tree)
    walker = _Walker(source, variables)
    facts = walker.visit(tree)
    problems = sorted(walker.problems, key=lambda p: (_PROBLEM_RANK.get(p.code, 0), p.offset))
    names = names_read(source) & variables.keys()
    return Analysis(tree, names, _kind_label(facts.kind), tuple(problems))


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the walker knows of a sub-expression: its type if static, its size if a literal."""

    kind: Variable | None = None
    size: int | None = None


_UNKNOWN: Final = _Facts()


def _kind_label(kind: Variable | None) -> str:
    if kind is None:
        return "dyn"
    if isinstance(kind, MessageType):
        return kind.name
    return kind.split("<", 1)[0]


class _Walker:
    """One pass: the result type and every problem, in the C++ engine's terms."""

    def __init__(self, source: str, variables: Mapping[str, Variable]) -> None:
        self.source = source
        self.variables = variables
        self.problems: list[CelCompileError] = []
        self.iterations = 0  # the static worst case; sizes known only at run time count 0
        self.comprehensions = 0
        self._scope: list[str] = []
        self._over_budget = False

    def visit(self, branch: Branch[Token]) -> _Facts:
        node = unwrap(branch)
        if not isinstance(node, Tree):
            return _UNKNOWN
        handler: Callable[[Tree[Token]], _Facts] | None = getattr(self, f"_on_{node.data}", None)
        if handler is None:
            for child in node.children:
                self.visit(child)
            return _UNKNOWN
        return handler(node)

    def _on_literal(self, node: Tree[Token]) -> _Facts:
        return _Facts(_LITERAL_KINDS.get(token(node.children[0]).type))

    def _on_ident(self, node: Tree[Token]) -> _Facts:
        return self._name(token(node.children[0]), root=False)

    def _on_dot_ident(self, node: Tree[Token]) -> _Facts:
        return self._name(token(node.children[0]), root=True)

    def _name(self, token: Token, *, root: bool) -> _Facts:
        name = str(token)
        if name in _RESERVED:
            self.problems.append(
                CelCompileError(SYNTAX, f"reserved identifier: {name}", start(token))
            )
            return _UNKNOWN
        if not root and name in self._scope:
            return _UNKNOWN
        variable = self.variables.get(name)
        if variable is None:
            self.problems.append(undeclared(name, start(token), self.variables, call=False))
            return _UNKNOWN
        return _Facts(None if variable == "dyn" else variable)

    def _on_member_dot(self, node: Tree[Token], offset: int | None = None) -> _Facts:
        receiver, name = node.children[0], token(node.children[1])
        at = dot_offset(self.source, name) if offset is None else offset
        chain = self._select_chain(node)
        if chain is not None and chain[0] not in self._scope and chain[0] not in self.variables:
            self.problems.append(undeclared(".".join(chain), at, self.variables, call=False))
            return _UNKNOWN
        kind = self.visit(receiver).kind
        if isinstance(kind, MessageType):
            field_kind = kind.fields.get(str(name))
            if field_kind is None:
                self.problems.append(
                    undefined_field(kind, str(name), at, self.variables, self.source)
                )
                return _UNKNOWN
            return _Facts(None if field_kind == "dyn" else field_kind)
        holder = container(kind)
        if holder is not None and holder[0] == "map":
            return _Facts(holder[1])
        return _UNKNOWN

    @staticmethod
    def _select_chain(node: Tree[Token]) -> list[str] | None:
        """``a.b.c`` as names when it is only selections on a bare name, as the checker reads it."""
        names: list[str] = []
        current: Branch[Token] = node
        while isinstance(current, Tree) and current.data == "member_dot":
            names.append(str(current.children[1]))
            current = unwrap(current.children[0])
        if isinstance(current, Tree) and current.data == "ident":
            names.append(str(current.children[0]))
            return names[::-1]
        return None

    def _on_member_index(self, node: Tree[Token]) -> _Facts:
        kind = self.visit(node.children[0]).kind
        self.visit(node.children[1])
        holder = container(kind)
        return _Facts(holder[1]) if holder is not None else _UNKNOWN

    def _on_member_object(self, node: Tree[Token]) -> _Facts:
        token = first_token(node)
        name = str(token) if token is not None else "?"
        offset = start(token) if token is not None else 0
        self.problems.append(undeclared(name, offset, self.variables, call=False))
        return _UNKNOWN

    def _on_ident_arg(self, node: Tree[Token]) -> _Facts:
        name = token(node.children[0])
        args = arguments(node, 1)
        if name == "has":
            return self._has(name, args)
        return self._call(name, None, args)

    _on_dot_ident_arg = _on_ident_arg

    def _on_member_dot_arg(self, node: Tree[Token]) -> _Facts:
        name = token(node.children[1])
        args = arguments(node, 2)
        if name in MACROS:
            return self._comprehension(name, node.children[0], args)
        return self._call(name, node.children[0], args)

    def _call(
        self, name: Token, receiver: Branch[Token] | None, arguments: list[Branch[Token]]
    ) -> _Facts:
        if name not in CALL_KINDS:
            offset = call_offset(self.source, name)
            self.problems.append(undeclared(str(name), offset, self.variables, call=True))
            return _UNKNOWN
        if receiver is not None:
            self.visit(receiver)
        for argument in arguments:
            self.visit(argument)
        if name == "matches" and arguments:
            self._check_regex(arguments[-1])
        return _Facts(CALL_KINDS[name])

    def _has(self, name: Token, arguments: list[Branch[Token]]) -> _Facts:
        offset = call_offset(self.source, name)
        if len(arguments) != 1:
            self.problems.append(undeclared("has", offset, self.variables, call=True))
            return _UNKNOWN
        target = unwrap(arguments[0])
        if not (isinstance(target, Tree) and target.data == "member_dot"):
            message = "has() takes one field selection, such as has(claims.role)"
            self.problems.append(CelCompileError(SYNTAX, message, self._position(target, offset)))
        else:
            self._on_member_dot(target, offset)
        return _Facts("bool")

    @staticmethod
    def _position(branch: Branch[Token], default: int) -> int:
        token = branch if isinstance(branch, Token) else first_token(branch)
        return default if token is None else start(token)

    def _comprehension(
        self, name: Token, receiver: Branch[Token], arguments: list[Branch[Token]]
    ) -> _Facts:
        offset = start(name)
        range_facts = self.visit(receiver)
        if not (len(arguments) == 2 or (name == "map" and len(arguments) == 3)):
            for argument in arguments:  # not a macro, so a call to an unknown function
                self.visit(argument)
            self.problems.append(
                undeclared(str(name), call_offset(self.source, name), self.variables, call=True)
            )
            return _UNKNOWN
        variable = unwrap(arguments[0])
        if not (isinstance(variable, Tree) and variable.data == "ident"):
            message = f"{name}() variable name must be a simple identifier"
            self.problems.append(CelCompileError(SYNTAX, message, self._position(variable, offset)))
            return _UNKNOWN
        if len(arguments) == 3:
            message = "map() with a filter is not supported by cel-python; use filter() first"
            self.problems.append(CelCompileError(SYNTAX, message, offset))
        outer_iterations, outer_comprehensions = self.iterations, self.comprehensions
        self.iterations = self.comprehensions = 0
        self._scope.append(str(variable.children[0]))
        for body in arguments[1:]:
            self.visit(body)
        self._scope.pop()
        size, nested = range_facts.size, self.comprehensions
        inner = 0 if size is None else size * (1 + self.iterations)
        self.iterations = outer_iterations + inner
        self.comprehensions = outer_comprehensions + nested + 1
        if size is None and nested:
            self.problems.append(
                CelCompileError(
                    TOO_COMPLEX,
                    f"a comprehension inside {name}() over a list known only at run time has "
                    "no bound on its cost",
                    offset,
                    "test the inner condition with `in`, or precompute the inner list",
                )
            )
        elif self.iterations > ITERATION_BUDGET and not self._over_budget:
            self._over_budget = True
            self.problems.append(
                CelCompileError(
                    TOO_COMPLEX,
                    f"the comprehensions would run {self.iterations} iterations; the budget "
                    f"is {ITERATION_BUDGET} per evaluation",
                    offset,
                )
            )
        if name in ("map", "filter"):
            return _Facts("list", size)
        return _Facts("bool")

    def _check_regex(self, argument: Branch[Token]) -> None:
        node = unwrap(argument)
        if not (isinstance(node, Tree) and node.data == "literal"):
            return
        literal = token(node.children[0])
        if literal.type not in ("STRING_LIT", "MLSTRING_LIT"):
            return
        pattern = str(celpy.evaluation.celstr(literal))
        problem = regex_problem(pattern)
        if problem is not None:
            message = f"invalid regular expression {pattern!r}: {problem}"
            self.problems.append(CelCompileError(BAD_REGEX, message, start(literal)))

    def _on_list_lit(self, node: Tree[Token]) -> _Facts:
        elements = arguments(node, 0)
        for element in elements:
            self.visit(element)
        return _Facts("list", len(elements))

    def _on_map_lit(self, node: Tree[Token]) -> _Facts:
        entries = arguments(node, 0)
        for entry in entries:
            self.visit(entry)
        return _Facts("map", len(entries) // 2)

    def _on_expr(self, node: Tree[Token]) -> _Facts:
        condition, then, otherwise = node.children
        self.visit(condition)
        then_kind, otherwise_kind = self.visit(then).kind, self.visit(otherwise).kind
        return _Facts(then_kind if then_kind == otherwise_kind else None)

    def _on_conditionalor(self, node: Tree[Token]) -> _Facts:
        for operand in operands(node):
            self.visit(operand)
        return _Facts("bool")

    _on_conditionaland = _on_conditionalor

    def _on_relation(self, node: Tree[Token]) -> _Facts:
        self._operands(node)
        return _Facts("bool")

    def _on_addition(self, node: Tree[Token]) -> _Facts:
        left, right = self._operands(node)
        return _Facts(left if left == right and isinstance(left, str) else None)

    _on_multiplication = _on_addition

    def _on_unary(self, node: Tree[Token]) -> _Facts:
        operator, operand = node.children
        kind = self.visit(operand).kind
        negation = isinstance(operator, Tree) and operator.data == "unary_not"
        return _Facts("bool" if negation else kind)

    def _operands(self, node: Tree[Token]) -> tuple[Variable | None, Variable | None]:
        operator, right = node.children
        left = operator.children[0] if isinstance(operator, Tree) else operator
        return self.visit(left).kind, self.visit(right).kind
