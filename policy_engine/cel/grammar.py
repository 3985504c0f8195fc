"""CEL's grammar, as cel-python ships it, built once for every module that parses CEL.

Both engines' checks and the fast path read expressions through it (see
:mod:`policy_engine.cel.tree`), so all of them read an expression exactly alike.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import celpy.celparser
from lark import Lark


@cache
def parser() -> Lark:
    """celpy's grammar, keeping every node's position so its text can be sliced out."""
    grammar = (Path(celpy.celparser.__file__).parent / "cel.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        start="expr",
        g_regex_flags=re.M,
        lexer_callbacks={"IDENT": celpy.celparser.CELParser.ambiguous_literals},
        propagate_positions=True,
        maybe_placeholders=False,
        priority="invert",
    )
