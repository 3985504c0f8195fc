"""The CEL grammar's parser tables, kept between starts in a private cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policy_engine.cel import grammar


def test_the_tables_are_kept_in_a_private_folder_and_parse_as_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = grammar.parser.__wrapped__()  # builds the tables and writes them
    kept = tmp_path / "policy-engine"
    (cache_file,) = kept.iterdir()
    loaded = grammar.parser.__wrapped__()  # from the file

    assert oct(kept.stat().st_mode & 0o777) == oct(0o700)
    assert cache_file.name.startswith("cel-grammar-lark-")
    text = 'conn.user_id == "" && true'
    assert loaded.parse(text) == built.parse(text)
    literal = next(loaded.parse(text).scan_values(lambda token: token == "true"))
    assert (literal.type, literal.start_pos) == ("BOOL_LIT", len(text) - 4)


def test_a_folder_others_may_write_to_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    shared = tmp_path / "policy-engine"
    shared.mkdir()
    os.chmod(shared, 0o777)  # the very case refused

    assert grammar._cache_file() is None
    assert grammar.parser.__wrapped__().parse("1 + 1") is not None  # built, not cached
    assert list(shared.iterdir()) == []
