from __future__ import annotations

import pytest

from policy_engine.cel.analysis import conjuncts, event_name_filter, field_path, names_read


@pytest.mark.parametrize(
    ("source", "names", "rest"),
    [
        ('event.name == "a"', {"a"}, None),
        ("event.name == 'a'", {"a"}, None),
        ('event.name in ["a", "b"]', {"a", "b"}, None),
        ('event.name == "a" && claims.role == "x"', {"a"}, ' claims.role == "x"'),
        ('event.name == "a" && (x || y)', {"a"}, " (x || y)"),
        ('event.name == "a" && b && c', {"a"}, " b && c"),
    ],
)
def test_a_leading_event_name_test_is_recognised(
    source: str, names: set[str], rest: str | None
) -> None:
    assert event_name_filter(source) == (frozenset(names), rest)


@pytest.mark.parametrize(
    "source",
    [
        'event.name == "a" || load.loop_lag_ms > 1',  # || binds looser than the name test
        'event.name == "a" && x || y',
        'event.name != "a"',
        'event.name == "a" ? true : false',
        'claims.role == "x" && event.name == "a"',
        'event.name == "a" + "b"',
        'event.name.startsWith("a")',
        '"&&" == event.name',
    ],
)
def test_anything_else_is_left_to_evaluation(source: str) -> None:
    assert event_name_filter(source) == (None, None)


def test_quoted_operators_do_not_split_the_expression() -> None:
    names, rest = event_name_filter('event.name == "a&&b" && conn.ip == "||"')
    assert names == frozenset({"a&&b"})
    assert rest == ' conn.ip == "||"'


@pytest.mark.parametrize(
    ("source", "path"),
    [("conn.sid", ("conn", "sid")), (" conn.ip ", ("conn", "ip")), ("conn.ip + 'x'", None)],
)
def test_plain_field_reads_are_recognised(source: str, path: tuple[str, str] | None) -> None:
    assert field_path(source) == path


@pytest.mark.parametrize(
    ("source", "parts"),
    [
        (
            'load.loop_lag_ms > 300 && event.priority == "normal"',
            ["load.loop_lag_ms > 300", 'event.priority == "normal"'],
        ),
        ("a && (b || c) && f('&&')", ["a", "(b || c)", "f('&&')"]),
        ("a || b && c", None),  # || binds looser: b && c is not required
        ("a && b ? c : d", None),
        # A triple-quoted string may hold a lone quote; a raw string's backslash escapes
        # nothing: neither may hide (or invent) an operator.
        ("'''it's''' == event.name || event.name == '''it's''' && load.x > 1", None),
        ('"""x " y""" == z && w', ['"""x " y""" == z', "w"]),
        ('r"a\\" == x && y', ['r"a\\" == x', "y"]),
        ('"a\\" && b" == x && y', ['"a\\" && b" == x', "y"]),
    ],
)
def test_conjuncts_are_the_operands_every_one_of_which_must_hold(
    source: str, parts: list[str] | None
) -> None:
    assert conjuncts(source) == parts


def test_a_name_test_before_a_triple_quoted_string_and_an_or_is_not_a_prefilter() -> None:
    source = "event.name == 'a' && '''it's''' != '' || claims.banned == true"
    assert event_name_filter(source) == (None, None)


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("load.loop_lag_ms > 300", {"load"}),
        ('load.x > 1.5e3 && event.priority == "low"', {"load", "event"}),
        ("has(claims.plan) && size(conn.ip) > 0u", {"claims", "conn"}),  # calls are not names
        ("'load' + \"event.x\" == r'conn'", set()),  # nor is anything inside a string
        ("true && null == load.x || 0xFF in [1]", {"load"}),
        ("conn.tags.all(t, t != load.x)", {"conn", "t", "load"}),  # more, never fewer
    ],
)
def test_the_names_an_expression_may_read(source: str, names: set[str]) -> None:
    assert names_read(source) == names
