"""CEL parse trees: one parse per source, and the helpers every reader of a tree shares.

The checker's walk, the facts the compiler asks for and the fast path all read the same
tree from celpy's grammar, so they agree on what an expression is: comments, raw and
triple-quoted strings are the lexer's business, never a scan of the text. A source is
parsed once (with positions, so a sub-expression's text can be sliced out of its source)
and the tree shared; nothing may change a tree it is given.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from lark import Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedToken
from lark.tree import Branch

from policy_engine.cel.checks import (
    MAX_DEPTH,
    MAX_NODES,
    MAX_TREE_DEPTH,
    SYNTAX,
    TOO_COMPLEX,
    CelCompileError,
)
from policy_engine.cel.grammar import parser

# Single-child grammar levels that carry no operation of their own.
WRAPPERS: Final = frozenset(
    {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication"}
    | {"unary", "member", "primary"}
)
_ALWAYS_OPERATIONS: Final = frozenset(
    {"literal", "ident", "dot_ident", "ident_arg", "dot_ident_arg", "member_dot"}
    | {"member_dot_arg", "member_index", "member_object", "list_lit", "map_lit"}
)
_BALANCED: Final = frozenset({"conditionalor", "conditionaland"})


def parse(source: str) -> Tree[Token]:
    """The tree of ``source``; a syntax error is a :class:`CelCompileError` with its offset."""
    try:
        return _parse(source)
    except UnexpectedCharacters as exc:
        offset = exc.pos_in_stream or 0
        character = source[offset : offset + 1]
        raise CelCompileError(
            SYNTAX, f"Syntax error: unexpected character {character!r}", offset
        ) from None
    except UnexpectedToken as exc:
        token = exc.token
        if token.type == "$END":
            raise CelCompileError(
                SYNTAX, "Syntax error: the expression ends too early", len(source)
            ) from None
        raise CelCompileError(
            SYNTAX, f"Syntax error: unexpected {str(token)!r}", start(token)
        ) from None
    except UnexpectedEOF:
        raise CelCompileError(
            SYNTAX, "Syntax error: the expression ends too early", len(source)
        ) from None
    except LarkError as exc:
        raise CelCompileError(SYNTAX, f"Syntax error: {exc}") from None


@lru_cache(maxsize=16)
def _parse(source: str) -> Tree[Token]:
    # Compiling one expression reads its tree several times in a row (checks, fast path,
    # facts); a tree is large, so only the last few are kept.
    return parser().parse(source)


def check_shape(tree: Tree[Token]) -> None:
    """Refuse a tree over the size or nesting bounds.

    Iterative on purpose: it guards the recursive passes that follow. A chain of ``||`` or
    ``&&`` counts as one level, as the C++ parser balances it; parentheses count.
    """
    nodes = depth = tree_depth = 0
    stack: list[tuple[Tree[Token], int, int, bool]] = [(tree, 0, 1, False)]
    while stack:
        node, level, height, continues_chain = stack.pop()
        operation = _is_operation(node)
        nodes += operation
        if (operation and not continues_chain) or node.data == "paren_expr":
            level += 1
        depth = max(depth, level)
        tree_depth = max(tree_depth, height)
        for index, child in enumerate(node.children):
            if isinstance(child, Tree):
                chain = (
                    index == 0
                    and node.data in _BALANCED
                    and child.data == node.data
                    and len(node.children) > 1
                )
                stack.append((child, level, height + 1, chain))
    if nodes > MAX_NODES:
        raise CelCompileError(
            TOO_COMPLEX, f"the expression has {nodes} operations; the limit is {MAX_NODES}"
        )
    if depth > MAX_DEPTH or tree_depth > MAX_TREE_DEPTH:
        raise CelCompileError(
            TOO_COMPLEX,
            f"the expression nests more than {MAX_DEPTH} levels deep",
            hint="split it, or use `in` with a list instead of a long chain of `+` or `==`",
        )


def _is_operation(node: Tree[Token]) -> bool:
    if node.data in _ALWAYS_OPERATIONS:
        return True
    return node.data in WRAPPERS and len(node.children) > 1


def bare(branch: Branch[Token]) -> Branch[Token]:
    """The operation under single-child grammar levels, stopping at parentheses."""
    node = branch
    while isinstance(node, Tree) and node.data in WRAPPERS and len(node.children) == 1:
        node = node.children[0]
    return node


def unwrap(branch: Branch[Token]) -> Branch[Token]:
    """The operation under single-child grammar levels and parentheses."""
    node = bare(branch)
    while isinstance(node, Tree) and node.data == "paren_expr":
        node = bare(node.children[0])
    return node


def operands(node: Tree[Token]) -> list[Tree[Token]]:
    """The operands of a chain of ``&&`` (or of ``||``) rooted at ``node``, left to right.

    The grammar nests a chain to the left: ``a && b && c`` is ``(a && b) && c``. A node
    that is not such an operator is its own only operand.
    """
    if node.data not in _BALANCED:
        return [node]
    found: list[Tree[Token]] = []
    current = node
    while current.data == node.data and len(current.children) == 2:
        left, right = current.children
        if not (isinstance(left, Tree) and isinstance(right, Tree)):
            break
        found.append(right)
        current = left
    found.append(current)
    return found[::-1]


def text(node: Tree[Token], source: str) -> str:
    """The source text of a sub-expression: itself a CEL expression, comments included."""
    return source[node.meta.start_pos : node.meta.end_pos]


def arguments(node: Tree[Token], index: int) -> list[Branch[Token]]:
    """The expressions of the argument list (or list literal) at ``node.children[index]``."""
    if len(node.children) > index and isinstance(found := node.children[index], Tree):
        return list(found.children)
    return []


def token(branch: Branch[Token]) -> Token:
    if not isinstance(branch, Token):
        raise TypeError(f"expected a token, got {branch!r}")
    return branch


def first_token(node: Tree[Token]) -> Token | None:
    return next((t for t in node.scan_values(lambda v: isinstance(v, Token))), None)


def start(token: Token) -> int:
    return token.start_pos or 0


def call_offset(source: str, name: Token) -> int:
    """The C++ engine places a call at its opening parenthesis."""
    found = source.find("(", name.end_pos or 0)
    return found if found >= 0 else start(name)


def dot_offset(source: str, name: Token) -> int:
    """The C++ engine places a field selection at its dot."""
    found = source.rfind(".", 0, start(name))
    return found if found >= 0 else start(name)
