"""CEL's grammar, as cel-python ships it, built once for every module that parses CEL.

The CEL adapter analyses sources with it (variables, bounds, regex literals, the fallback's
checks) and the fast path compiles its subset from the same trees, so both must read an
expression exactly alike.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import celpy.celparser
from lark import Lark


@cache
def parser(*, positions: bool) -> Lark:
    """celpy's grammar; without positions it parses twice as fast (tokens keep theirs)."""
    grammar = (Path(celpy.celparser.__file__).parent / "cel.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        start="expr",
        g_regex_flags=re.M,
        lexer_callbacks={"IDENT": celpy.celparser.CELParser.ambiguous_literals},
        propagate_positions=positions,
        maybe_placeholders=False,
        priority="invert",
    )
