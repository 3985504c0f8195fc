"""CEL's grammar, as cel-python ships it, built once for every module that parses CEL.

Both engines' checks and the fast path read expressions through it (see
:mod:`policy_engine.cel.tree`), so all of them read an expression exactly alike.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import celpy.celparser
from lark import Lark, Token


@cache
def parser() -> Lark:
    """celpy's grammar, keeping every node's position so its text can be sliced out."""
    grammar = (Path(celpy.celparser.__file__).parent / "cel.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        start="expr",
        g_regex_flags=re.M,
        lexer_callbacks={"IDENT": _literal_words},
        propagate_positions=True,
        maybe_placeholders=False,
        priority="invert",
    )


def _literal_words(token: Token) -> Token:
    """``true`` and ``false`` lex as names; they are bool literals, at the same position.

    celpy's own callback builds the new token without a position, which would leave every
    node around a bool literal without a span.
    """
    if token.value in ("true", "false"):
        return Token.new_borrow_pos("BOOL_LIT", token.value, token)
    return token
