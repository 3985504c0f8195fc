from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import policy_engine.language.source as source_module
from policy_engine.errors import Diagnostic, PolicyError
from policy_engine.language.source import (
    DEFAULT_LIMITS,
    SourceDocument,
    SourceLimits,
    build_pointer,
    load_source,
    parse_source,
)

PARSERS = {"libyaml": getattr(yaml, "CSafeLoader", None), "python": yaml.SafeLoader}


@pytest.fixture(params=sorted(PARSERS))
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test over libyaml and over the pure-Python fallback."""
    loader = PARSERS[request.param]
    if loader is None:
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr(source_module, "_LOADER", loader)
    return str(request.param)


def refuse(text: str | bytes, limits: SourceLimits = DEFAULT_LIMITS) -> Diagnostic:
    with pytest.raises(PolicyError) as caught:
        parse_source(text, "policy.yaml", limits=limits)
    assert caught.value.diagnostics, "a refusal must carry a diagnostic"
    return caught.value.diagnostics[0]


def where(diagnostic: Diagnostic) -> tuple[int, int]:
    return (diagnostic.location.line, diagnostic.location.column)


def resolve(data: Any, pointer: str) -> Any:
    node = data
    for escaped in pointer.split("/")[1:]:
        token = escaped.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


POLICY = """\
# yaml-language-server: $schema=policy.schema.json
version: 1
rate_limits:
  - name: connect-per-ip
    key: conn.ip
    window: {calls: 20, time: 60s}
  - name: user-actions
    tags: [a, "b"]
"""


# --- positions -----------------------------------------------------------------------


def test_positions_of_nested_nodes_are_their_values_one_based(parser: str) -> None:
    document = parse_source(POLICY, "policies.yaml")

    assert document.positions[""] == (2, 1)
    assert document.positions["/version"] == (2, 10)
    assert document.positions["/rate_limits"] == (4, 3)
    assert document.positions["/rate_limits/0"] == (4, 5)
    assert document.positions["/rate_limits/0/key"] == (5, 10)
    assert document.positions["/rate_limits/0/window"] == (6, 13)
    assert document.positions["/rate_limits/0/window/time"] == (6, 31)
    assert document.positions["/rate_limits/1/tags/1"] == (8, 15)


def test_key_positions_point_at_the_key_and_skip_list_items(parser: str) -> None:
    document = parse_source(POLICY)

    assert document.key_positions["/rate_limits"] == (3, 1)
    assert document.key_positions["/rate_limits/0/window/calls"] == (6, 14)
    assert document.key_positions["/rate_limits/1/tags"] == (8, 5)
    assert "/rate_limits/0" not in document.key_positions
    assert "" not in document.key_positions


def test_every_recorded_pointer_resolves_in_the_data() -> None:
    document = parse_source(POLICY)

    for pointer in document.positions:
        resolve(document.data, pointer)
    assert set(document.key_positions) <= set(document.positions)


def test_positions_cannot_be_modified() -> None:
    document = parse_source(POLICY)

    with pytest.raises(TypeError):
        document.positions["/version"] = (1, 1)  # type: ignore[index]


def test_locate_falls_back_to_the_nearest_written_ancestor() -> None:
    document = parse_source(POLICY, "policies.yaml")

    missing = document.locate("/rate_limits/1/limit")
    assert (missing.file, missing.line, missing.column) == ("policies.yaml", 7, 5)
    assert missing.pointer == "/rate_limits/1/limit"
    assert document.locate("/nothing/deeper/still").line == 2
    assert document.locate("/rate_limits/0/key").column == 10
    assert document.locate("/rate_limits/0/key", key=True).column == 5


def test_locate_with_key_uses_the_value_where_there_is_no_key() -> None:
    document = parse_source(POLICY)

    located = document.locate("/rate_limits/1", key=True)
    assert (located.line, located.column) == (7, 5)


def test_pointer_tokens_are_escaped_per_rfc_6901() -> None:
    document = parse_source("paths:\n  a/b: 1\n  m~n: {x/~: 2}\n")

    assert document.positions["/paths/a~1b"] == (2, 8)
    assert document.positions["/paths/m~0n/x~1~0"] == (3, 14)
    assert build_pointer(["paths", "m~n", "x/~", 0]) == "/paths/m~0n/x~1~0/0"
    assert build_pointer([]) == ""


def test_columns_count_characters_not_bytes(parser: str) -> None:
    document = parse_source("names: {é: ünï, k: v}\n".encode())

    assert document.positions["/names/k"] == (1, 20)


def test_byte_order_mark_and_crlf_line_endings_are_accepted(parser: str) -> None:
    document = parse_source(b"\xef\xbb\xbfversion: 1\r\nname: x\r\n")

    assert document.data == {"version": 1, "name": "x"}
    assert document.text.startswith("version")
    assert document.positions["/version"] == (1, 10)
    assert document.positions["/name"] == (2, 7)


# --- scalars -------------------------------------------------------------------------


def test_norway_problem_words_stay_strings() -> None:
    document = parse_source("on: yes\noff: no\ny: n\nNO: On\ncountry: NO\n")

    assert document.data == {"on": "yes", "off": "no", "y": "n", "NO": "On", "country": "NO"}


def test_booleans_follow_yaml_1_2_core() -> None:
    document = parse_source("a: [true, True, TRUE, false, False, FALSE, tRUE, yes]\n")

    assert document.data["a"] == [True, True, True, False, False, False, "tRUE", "yes"]


def test_numbers_and_nulls_resolve_like_safe_load() -> None:
    text = "n: [1, -2, 0x1F, 010, 1_000, 1.5, .5, 1.0e+3, ~, null, 1e3]\nempty:\n"
    document = parse_source(text)

    assert document.data["n"] == [1, -2, 31, 8, 1000, 1.5, 0.5, 1000.0, None, None, "1e3"]
    assert document.data["empty"] is None
    assert document.data == yaml.safe_load(text)
    special = parse_source("f: [.inf, -.Inf, .nan]\n").data["f"]
    assert special[:2] == [math.inf, -math.inf]
    assert math.isnan(special[2])


def test_timestamps_and_sexagesimal_numbers_stay_strings() -> None:
    document = parse_source("day: 2024-01-31\nat: 2024-01-31T10:00:00Z\nwindow: 1:30\n")

    assert document.data == {"day": "2024-01-31", "at": "2024-01-31T10:00:00Z", "window": "1:30"}


def test_quoted_and_explicitly_tagged_scalars(parser: str) -> None:
    text = "a: '1'\nb: ! 5\nc: !!int '7'\nd: !!str 5\ne: !!float 1\nf: !!null ''\ng: 0b_\n"
    document = parse_source(text)

    assert document.data == {"a": "1", "b": "5", "c": 7, "d": "5", "e": 1.0, "f": None, "g": "0b_"}


def test_aliases_expand_to_independent_copies_positioned_at_the_anchor(parser: str) -> None:
    text = "base: &b {limit: 5/second, tags: [x]}\nrules:\n  - *b\n  - *b\n"
    document = parse_source(text)

    first, second = document.data["rules"]
    assert first == second == document.data["base"]
    assert first is not second
    assert first["tags"] is not document.data["base"]["tags"]
    assert document.positions["/rules/1"] == (4, 5)
    assert document.positions["/rules/1/tags/0"] == document.positions["/base/tags/0"]
    assert document.key_positions["/rules/0/limit"] == (1, 11)


# --- refusals ------------------------------------------------------------------------


def test_yaml_syntax_error_reports_the_problem_and_its_position(parser: str) -> None:
    diagnostic = refuse("version: 1\nrate_limits: [a, b\nerrors: []\n")

    assert diagnostic.code == "yaml-syntax"
    assert diagnostic.location.file == "policy.yaml"
    assert diagnostic.location.line == 3
    assert "expected ',' or ']'" in diagnostic.message
    assert "line 2" in diagnostic.message


def test_tab_indentation_gets_a_hint(parser: str) -> None:
    diagnostic = refuse("version: 1\nrate_limits:\n\t- name: a\n")

    assert diagnostic.code == "yaml-syntax"
    assert where(diagnostic) == (3, 1)
    assert "tabs" in diagnostic.hint


def test_unquoted_colon_in_a_value_gets_a_hint(parser: str) -> None:
    diagnostic = refuse("version: 1\nwhen: a: b\n")

    assert (diagnostic.code, where(diagnostic)) == ("yaml-syntax", (2, 8))
    assert "mapping values are not allowed" in diagnostic.message
    assert "quote" in diagnostic.hint


def test_duplicate_key_is_refused_at_its_second_occurrence(parser: str) -> None:
    text = (
        "version: 1\nrate_limits:\n  - name: a\n"
        "    limit: 5/second\n    burst: 2\n    limit: 9/second\n"
    )
    diagnostic = refuse(text)

    assert diagnostic.code == "duplicate-key"
    assert where(diagnostic) == (6, 5)
    assert diagnostic.message == "duplicate key 'limit' (first defined at line 4)"
    assert diagnostic.location.pointer == "/rate_limits/0/limit"


def test_same_key_in_different_mappings_is_not_a_duplicate() -> None:
    document = parse_source("a: {name: x}\nb: {name: x}\n")

    assert document.data == {"a": {"name": "x"}, "b": {"name": "x"}}


@pytest.mark.parametrize(
    ("text", "found", "position"),
    [
        ("version: 1\n1: x\n", "an integer", (2, 1)),
        ("version: 1\ntrue: x\n", "a boolean", (2, 1)),
        ("version: 1\n~: x\n", "null", (2, 1)),
        ("version: 1\n[a, b]: x\n", "a list", (2, 1)),
        ("version: 1\nrules: {1.5: x}\n", "a number", (2, 9)),
    ],
)
def test_non_string_key_is_refused(text: str, found: str, position: tuple[int, int]) -> None:
    diagnostic = refuse(text)

    assert diagnostic.code == "non-string-key"
    assert where(diagnostic) == position
    assert found in diagnostic.message


def test_every_key_problem_is_reported_in_one_run() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_source("a: 1\n2: x\na: 3\nb: {c: 1, c: 2}\n")

    found = [(d.code, d.location.line) for d in caught.value.diagnostics]
    assert found == [("non-string-key", 2), ("duplicate-key", 3), ("duplicate-key", 4)]


def test_oversized_text_is_refused_before_parsing() -> None:
    limits = SourceLimits(max_bytes=100)

    diagnostic = refuse("a: " + "x" * 100 + "\n", limits)
    assert diagnostic.code == "file-too-large"
    assert "100 bytes" in diagnostic.message
    assert refuse(b"a: [" + b"1," * 60 + b"]", limits).code == "file-too-large"
    assert refuse("a: " + "é" * 49, limits).code == "file-too-large"  # 101 bytes, 52 chars


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only a comment\n", "---\n", "--- # c\n...\n"])
def test_empty_file_is_refused(text: str) -> None:
    diagnostic = refuse(text)

    assert diagnostic.code == "empty-file"
    assert "empty" in diagnostic.message


def test_byte_order_mark_alone_is_an_empty_file() -> None:
    assert refuse(b"\xef\xbb\xbf").code == "empty-file"


def test_invalid_utf8_is_refused_with_the_position_of_the_first_bad_byte() -> None:
    diagnostic = refuse(b"version: 1\nname: \xc3\xa9t\xe9\nx: \xff\n")

    assert diagnostic.code == "not-utf8"
    assert where(diagnostic) == (2, 9)
    assert "0xe9" in diagnostic.message


def test_utf16_file_is_refused_as_not_utf8() -> None:
    diagnostic = refuse("version: 1\n".encode("utf-16"))

    assert (diagnostic.code, where(diagnostic)) == ("not-utf8", (1, 1))


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("- a\n- b\n", "a list"),
        ("just text\n", "a string"),
        ("null\n", "null"),
        ("42\n", "an integer"),
    ],
)
def test_top_level_must_be_a_mapping(text: str, found: str) -> None:
    diagnostic = refuse(text)

    assert (diagnostic.code, where(diagnostic)) == ("not-a-mapping", (1, 1))
    assert found in diagnostic.message


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("run: !!python/object/apply:os.system ['echo hi']\n", "!!python/object/apply:os.system"),
        ("run: !!python/name:os.system\n", "!!python/name:os.system"),
        ("blob: !!binary aGk=\n", "!!binary"),
        ("day: !!timestamp 2024-01-01\n", "!!timestamp"),
        ("s: !!set {a: null}\n", "!!set"),
        ("home: !env HOME\n", "!env"),
        ("m: !!seq {a: 1}\n", "!!seq"),
    ],
)
def test_unsupported_tag_is_refused(text: str, tag: str) -> None:
    diagnostic = refuse(text)

    assert (diagnostic.code, where(diagnostic)) == ("unsupported-tag", (1, text.index("!") + 1))
    assert tag in diagnostic.message


def test_value_that_does_not_fit_its_tag_is_refused() -> None:
    diagnostic = refuse("version: 1\nburst: !!int many\n")

    assert (diagnostic.code, where(diagnostic)) == ("invalid-scalar", (2, 8))
    assert "'many' is not a valid !!int" in diagnostic.message


def test_merge_key_is_refused_but_a_quoted_one_is_a_plain_key() -> None:
    diagnostic = refuse("base: &b {a: 1}\nrule:\n  <<: *b\n  c: 2\n")

    assert (diagnostic.code, where(diagnostic)) == ("unsupported-merge-key", (3, 3))
    assert parse_source("rule: {'<<': x}\n").data == {"rule": {"<<": "x"}}


def test_recursive_alias_is_refused(parser: str) -> None:
    diagnostic = refuse("version: 1\nloop: &a [1, *a]\n")

    assert (diagnostic.code, where(diagnostic)) == ("recursive-alias", (2, 14))


def test_undefined_alias_is_a_syntax_error(parser: str) -> None:
    diagnostic = refuse("version: 1\nx: *nope\n")

    assert (diagnostic.code, where(diagnostic)) == ("yaml-syntax", (2, 4))
    assert "undefined alias 'nope'" in diagnostic.message


def test_second_document_is_refused(parser: str) -> None:
    diagnostic = refuse("version: 1\n---\nversion: 2\n")

    assert (diagnostic.code, where(diagnostic)) == ("yaml-syntax", (2, 1))
    assert "single document" in diagnostic.message


def test_control_character_is_refused_at_its_position() -> None:
    diagnostic = refuse("version: 1\nname: a\x07b\n")

    assert (diagnostic.code, where(diagnostic)) == ("yaml-syntax", (2, 8))
    assert "U+0007" in diagnostic.message


def test_nesting_beyond_the_limit_is_refused(parser: str) -> None:
    text = "".join(" " * depth + f"k{depth}:\n" for depth in range(70))
    diagnostic = refuse(text)

    assert (diagnostic.code, where(diagnostic)) == ("too-deep", (65, 65))
    assert "64 levels" in diagnostic.message
    parse_source("".join(" " * depth + f"k{depth}:\n" for depth in range(64)))


@pytest.mark.parametrize("opening", ["[", "{a: ", "a: [", "- "])
def test_ten_thousand_nested_openings_are_refused_without_recursion(
    parser: str, opening: str
) -> None:
    diagnostic = refuse("a:\n  " + opening * 10_000)

    assert diagnostic.code == "too-deep"
    assert diagnostic.location.line == 2


def test_alias_that_would_nest_beyond_the_limit_is_refused() -> None:
    text = "deep: &d [[[[x]]]]\nwrap: [[[*d]]]\n"
    diagnostic = refuse(text, SourceLimits(max_depth=7))

    assert (diagnostic.code, where(diagnostic)) == ("too-deep", (2, 10))
    assert parse_source(text, limits=SourceLimits(max_depth=8)).data["wrap"][0][0][0] == [[[["x"]]]]


def test_too_many_nodes_is_refused() -> None:
    text = "version: 1\nitems:\n" + "".join(f"  - {i}\n" for i in range(50))
    diagnostic = refuse(text, SourceLimits(max_nodes=40))

    assert diagnostic.code == "too-many-nodes"
    assert diagnostic.location.line == 38  # five nodes before the list, item 35 is the 41st
    assert "40 nodes" in diagnostic.message


LAUGHS = "lol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"l{level}: &{chr(98 + level)} [{', '.join([f'*{chr(97 + level)}'] * 9)}]\n"
    for level in range(8)
)  # nine levels: 9**9 strings, gigabytes once expanded


def test_billion_laughs_is_refused_by_the_alias_budget(parser: str) -> None:
    diagnostic = refuse(LAUGHS)

    assert diagnostic.code == "too-many-aliases"
    assert diagnostic.location.line == 4
    assert "100 alias expansions" in diagnostic.message


def test_billion_laughs_is_refused_by_the_node_budget_when_aliases_are_allowed() -> None:
    diagnostic = refuse(LAUGHS, SourceLimits(max_aliases=10**12, max_nodes=10_000))

    assert diagnostic.code == "too-many-nodes"
    assert diagnostic.location.line == 5


def test_reused_anchor_within_budget_is_accepted() -> None:
    text = "d: &d {mode: shadow}\nrules:\n" + "".join("  - *d\n" for _ in range(100))
    assert len(parse_source(text).data["rules"]) == 100
    assert refuse(text + "  - *d\n").code == "too-many-aliases"


# --- files ---------------------------------------------------------------------------


def test_load_source_reads_the_file_and_displays_the_given_path(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICY, encoding="utf-8")

    document = load_source(path)
    assert isinstance(document, SourceDocument)
    assert document.path == str(path)
    assert document.locate("/rate_limits/0/key").file == str(path)


def test_missing_file_is_an_io_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as caught:
        load_source(missing)

    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "io-error"
    assert diagnostic.location.file == str(missing)
    assert "not found" in diagnostic.message


def test_directory_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_source(tmp_path)

    assert caught.value.diagnostics[0].code == "io-error"


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"a: " + b"x" * 5000)
    with pytest.raises(PolicyError) as caught:
        load_source(path, limits=SourceLimits(max_bytes=4096))

    assert caught.value.diagnostics[0].code == "file-too-large"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs an endless file")
def test_load_source_reads_no_more_than_the_limit() -> None:
    with pytest.raises(PolicyError) as caught:
        load_source("/dev/zero", limits=SourceLimits(max_bytes=1024))

    assert caught.value.diagnostics[0].code == "file-too-large"


# --- any input -----------------------------------------------------------------------

YAMLISH = st.text(alphabet="[]{}:,-?&*!|>'\"#%@\t\n\r ab01.~\\é\ufeff", max_size=80)


def assert_parses_or_refuses(payload: str | bytes) -> None:
    outcome: SourceDocument | PolicyError
    try:
        outcome = parse_source(payload)
    except PolicyError as error:
        outcome = error
    if isinstance(outcome, PolicyError):
        assert outcome.diagnostics
        assert all(d.location.line >= 0 for d in outcome.diagnostics)
        return
    document = outcome
    assert isinstance(document.data, dict)
    for pointer in document.positions:
        resolve(document.data, pointer)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), YAMLISH))
def test_any_input_parses_or_is_refused_with_a_policy_error(payload: str | bytes) -> None:
    assert_parses_or_refuses(payload)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(), YAMLISH))
def test_any_input_parses_or_is_refused_by_the_pure_python_parser(payload: str) -> None:
    original = source_module._LOADER
    source_module._LOADER = yaml.SafeLoader  # type: ignore[misc]
    try:
        assert_parses_or_refuses(payload)
    finally:
        source_module._LOADER = original  # type: ignore[misc]
