"""Facts about a CEL expression, read off its parse tree, that let the engine skip work.

Most conditions start with a test of the event name (``event.name == "x" && ...``) and
many keys are a plain field (``conn.sid``): recognising those shapes once, at compile
time, turns an evaluation into a set lookup or a dict read. The facts come from the same
tree the checker walks, so a comment, a raw or triple-quoted string or an operator inside a
string can never be mistaken for code. Every fact is conservative: a shape not recognised
gives None (or "may read"), and the expression is simply evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Set as AbstractSet
from functools import lru_cache

from lark import Token, Tree
from lark.tree import Branch

from policy_engine.cel.checks import MACROS, CelCompileError
from policy_engine.cel.literals import string_value
from policy_engine.cel.tree import arguments, operands, parse, text, unwrap

# A field read: (variable, field), with field None when the variable is read some other way.
_Read = tuple[str, str | None]


def event_name_filter(source: str) -> tuple[frozenset[str] | None, str | None]:
    """The event names the expression requires, and what is left to evaluate after that test.

    Recognised: a name test (``event.name == "x"``, ``"x" == event.name``,
    ``event.name in ["x", "y"]``, or an ``||`` of name tests) standing alone or as the first
    operand of the top-level ``&&`` chain. The rest is None when the name test is the whole
    expression; otherwise it is the source of the remaining operands, which alone decide
    once the name matched (``true && x`` is ``x`` in CEL, errors included).
    """
    tree = _tree(source)
    if tree is None:
        return None, None
    node = unwrap(tree)
    if isinstance(node, Tree) and node.data == "conditionaland" and len(node.children) == 2:
        first, *others = operands(node)
        names = _name_test(first)
        if names is None:
            return None, None
        return names, source[others[0].meta.start_pos : others[-1].meta.end_pos]
    return _name_test(node), None


def conjuncts(source: str) -> list[str] | None:
    """The sources of the operands of the top-level ``&&`` chain (one for a source without).

    None when the source's top is an ``||`` or a ``?:``, whose operands are not all required
    for the whole to be true, or when it does not parse.
    """
    found = _conjuncts(source)
    return None if found is None else [text(operand, source) for operand in found]


def operands_reading_only(source: str, names: AbstractSet[str]) -> list[str] | None:
    """The sources of the :func:`conjuncts` that read no variable but ``names``, in order.

    While any of them is false the whole expression is (CEL's ``false && error`` is false
    too), so they make a gate that reads less, such as the ``load`` operands of a shedding
    condition. None when :func:`conjuncts` is.
    """
    found = _conjuncts(source)
    if found is None:
        return None
    return [
        text(operand, source)
        for operand in found
        if all(name in names for name, _ in _reads_of(operand))
    ]


def field_path(source: str) -> tuple[str, str] | None:
    """``("conn", "sid")`` for the source ``conn.sid``; None for anything else."""
    tree = _tree(source)
    if tree is None:
        return None
    node = unwrap(tree)
    if isinstance(node, Tree) and node.data == "member_dot":
        receiver = unwrap(node.children[0])
        if isinstance(receiver, Tree) and receiver.data == "ident":
            return str(receiver.children[0]), str(node.children[1])
    return None


def names_read(source: str) -> frozenset[str]:
    """The variables an expression reads: its free names, never a function's nor a
    comprehension's own variable. A source that does not parse reads nothing: it never runs.
    """
    return frozenset(name for name, _ in _reads(source) or ())


def reads_field(source: str, variable: str, field: str) -> bool:
    """Whether the expression may read ``variable.field``.

    True when it selects that field (``conn.connected_ms``, ``conn["connected_ms"]``,
    ``has(conn.connected_ms)``), reads ``variable`` in any other way than selecting a
    named field (``conn[key]``, ``[conn]``), or does not parse.
    """
    if field not in source and not _used_whole(source, variable):
        # Every use of ``variable`` in the text selects a named field, and none is this
        # one: the expression cannot read it, so there is nothing to parse.
        return False
    reads = _reads(source)
    return reads is None or (variable, field) in reads or (variable, None) in reads


def _used_whole(source: str, variable: str) -> bool:
    """Whether ``variable`` appears in the text without a ``.field`` after it.

    Only ever says too much (a name inside a string or a comment counts), never too little,
    so a False lets :func:`reads_field` skip the parse.
    """
    return re.search(rf"\b{re.escape(variable)}\b(?!\s*\.\s*[A-Za-z_])", source) is not None


def _tree(source: str) -> Tree[Token] | None:
    try:
        return parse(source)
    except CelCompileError:
        return None


def _name_test(branch: Branch[Token]) -> frozenset[str] | None:
    """The names an operand accepts when it only tests ``event.name``; else None."""
    node = unwrap(branch)
    if not isinstance(node, Tree):
        return None
    if node.data == "conditionalor" and len(node.children) == 2:
        names: set[str] = set()
        for operand in operands(node):
            found = _name_test(operand)
            if found is None:
                return None
            names |= found
        return frozenset(names)
    if node.data != "relation" or len(node.children) != 2:
        return None
    operation, right = node.children
    if not isinstance(operation, Tree):
        return None
    left = operation.children[0]
    if operation.data == "relation_eq":
        if _is_event_name(left):
            value = _string(right)
        elif _is_event_name(right):
            value = _string(left)
        else:
            return None
        return None if value is None else frozenset({value})
    if operation.data == "relation_in" and _is_event_name(left):
        items = unwrap(right)
        if not (isinstance(items, Tree) and items.data == "list_lit"):
            return None
        values = [_string(item) for item in arguments(items, 0)]
        return frozenset(v for v in values if v is not None) if None not in values else None
    return None


def _is_event_name(branch: Branch[Token]) -> bool:
    node = unwrap(branch)
    if not (isinstance(node, Tree) and node.data == "member_dot" and node.children[1] == "name"):
        return False
    receiver = unwrap(node.children[0])
    return (
        isinstance(receiver, Tree) and receiver.data == "ident" and receiver.children[0] == "event"
    )


def _string(branch: Branch[Token]) -> str | None:
    node = unwrap(branch)
    if isinstance(node, Tree) and node.data == "literal":
        literal = node.children[0]
        if isinstance(literal, Token):
            return string_value(literal)
    return None


def _conjuncts(source: str) -> list[Tree[Token]] | None:
    tree = _tree(source)
    if tree is None:
        return None
    node = unwrap(tree)
    if not isinstance(node, Tree):
        return None
    if node.data == "conditionalor" and len(node.children) == 2:
        return None
    if node.data == "expr" and len(node.children) == 3:
        return None
    return operands(node)


@lru_cache(maxsize=512)
def _reads(source: str) -> frozenset[_Read] | None:
    tree = _tree(source)
    return None if tree is None else _reads_of(tree)


def _reads_of(tree: Tree[Token]) -> frozenset[_Read]:
    """Every free name the expression reads, with the field it selects on it when it does.

    One iterative walk, each node carrying the comprehension variables in scope there.
    """
    found: set[_Read] = set()
    pending: list[tuple[Tree[Token], frozenset[str]]] = [(tree, frozenset())]
    while pending:
        node, scope = pending.pop()
        children: list[tuple[Branch[Token], frozenset[str]]] = [(c, scope) for c in node.children]
        if node.data in ("ident", "dot_ident"):
            name = _free_name(node, scope)
            if name is not None:
                found.add((name, None))
        elif node.data in ("member_dot", "member_index"):
            owner, field = _free_name(node.children[0], scope), _selected(node)
            if owner is not None and field is not None:
                found.add((owner, field))
                children = []
        elif (scoped := _comprehension_children(node, scope)) is not None:
            children = scoped
        pending.extend((child, s) for child, s in children if isinstance(child, Tree))
    return frozenset(found)


def _comprehension_children(
    node: Tree[Token], scope: frozenset[str]
) -> list[tuple[Branch[Token], frozenset[str]]] | None:
    """A comprehension's range in ``scope`` and its bodies with its variable bound too;
    None when ``node`` is not a well-formed comprehension."""
    if node.data != "member_dot_arg" or node.children[1] not in MACROS:
        return None
    args = arguments(node, 2)
    bound = unwrap(args[0]) if args else None
    if not (len(args) in (2, 3) and isinstance(bound, Tree) and bound.data == "ident"):
        return None
    inner = scope | {str(bound.children[0])}
    return [(node.children[0], scope), *((body, inner) for body in args[1:])]


def _free_name(branch: Branch[Token], scope: frozenset[str]) -> str | None:
    node = unwrap(branch)
    if isinstance(node, Tree) and node.data in ("ident", "dot_ident"):
        name = str(node.children[0])
        if node.data == "dot_ident" or name not in scope:
            return name
    return None


def _selected(node: Tree[Token]) -> str | None:
    """The field a selection names: ``x.f`` and ``x["f"]``; None for a computed key."""
    if node.data == "member_dot":
        return str(node.children[1])
    return _string(node.children[1])


def fields_read_under(source: str, variable: str, field: str) -> frozenset[str] | None:
    """The keys the expression selects on ``variable.field`` (``event.payload.cmd``, its
    ``["cmd"]`` and ``has()`` forms): ``{"cmd"}``.

    None when it may read ``variable.field`` as a whole: a computed key, the map passed to a
    function, a comprehension or ``in``, ``variable`` read bare, or a source that does not
    parse. The runtime converts only the keys named, so a conservative None means "all".
    """
    tree = _tree(source)
    if tree is None:
        return None
    found: set[str] = set()
    pending: list[tuple[Tree[Token], frozenset[str]]] = [(tree, frozenset())]
    while pending:
        node, scope = pending.pop()
        children: list[tuple[Branch[Token], frozenset[str]]] = [(c, scope) for c in node.children]
        if node.data in ("ident", "dot_ident") and _free_name(node, scope) == variable:
            return None
        if node.data in ("member_dot", "member_index"):
            receiver = unwrap(node.children[0])
            if _selects(receiver, variable, field, scope):
                key = _selected(node)
                if key is None:
                    return None
                found.add(key)
                children = children[1:] if node.data == "member_index" else []
            elif _free_name(receiver, scope) == variable:
                if _selected(node) in (None, field):
                    return None
                children = []
        elif (scoped := _comprehension_children(node, scope)) is not None:
            children = scoped
        pending.extend((child, s) for child, s in children if isinstance(child, Tree))
    return frozenset(found)


def comprehensions_over(source: str, variable: str, field: str) -> list[tuple[str, str, int]]:
    """The comprehensions (``exists``, ``all``, ``filter``, ...) whose range is a key of
    ``variable.field`` or the map itself: the key (``""`` for the map), the macro and its
    offset, in source order.

    The iterations such a comprehension costs are chosen by whoever sends the data.
    """
    if field not in source or not any(macro in source for macro in MACROS):
        return []  # no macro's name, or no such field, anywhere in the text: nothing to parse
    tree = _tree(source)
    if tree is None:
        return []
    found: list[tuple[str, str, int]] = []
    for node in tree.iter_subtrees():
        if node.data != "member_dot_arg" or node.children[1] not in MACROS:
            continue
        receiver = unwrap(node.children[0])
        name = node.children[1]
        offset = name.start_pos if isinstance(name, Token) and name.start_pos is not None else 0
        if _selects(receiver, variable, field, frozenset()):
            found.append(("", str(name), offset))
        elif isinstance(receiver, Tree) and receiver.data in ("member_dot", "member_index"):
            key = _selected(receiver)
            if key is not None and _selects(
                unwrap(receiver.children[0]), variable, field, frozenset()
            ):
                found.append((key, str(name), offset))
    return sorted(found, key=lambda item: item[2])


def _selects(branch: Branch[Token], variable: str, field: str, scope: frozenset[str]) -> bool:
    """Whether ``branch`` is exactly ``variable.field`` (or ``variable["field"]``)."""
    if not (isinstance(branch, Tree) and branch.data in ("member_dot", "member_index")):
        return False
    return _free_name(branch.children[0], scope) == variable and _selected(branch) == field
