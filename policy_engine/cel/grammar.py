"""CEL's grammar, as cel-python ships it, built once for every module that parses CEL.

Both engines' checks and the fast path read expressions through it (see
:mod:`policy_engine.cel.tree`), so all of them read an expression exactly alike.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import celpy.celparser
import lark
from lark import Lark, Token


@cache
def parser() -> Lark:
    """celpy's grammar, keeping every node's position so its text can be sliced out.

    Building its LALR tables takes about a second, most of a server's start (and a server
    that restarts slowly is one its clients' backoff waits longer for). Lark keeps the
    tables it built in the file given as ``cache``, and checks the grammar's hash before
    using them; the file lives in a cache folder only this user can write (never the
    shared temporary folder: Lark's cache is a pickle).
    """
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
        cache=_cache_file() or False,
    )


def _cache_file() -> str | None:
    """Where the parser's tables are kept: ``$XDG_CACHE_HOME/policy-engine`` (or
    ``~/.cache/policy-engine``), created private; None when there is no such place to
    write, or it is not this user's own."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "policy-engine"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None  # someone else could plant tables here
    return str(folder / f"cel-grammar-lark-{lark.__version__}.pickle")


def _literal_words(token: Token) -> Token:
    """``true`` and ``false`` lex as names; they are bool literals, at the same position.

    celpy's own callback builds the new token without a position, which would leave every
    node around a bool literal without a span.
    """
    if token.value in ("true", "false"):
        return Token.new_borrow_pos("BOOL_LIT", token.value, token)
    return token
