from __future__ import annotations

import pytest

from policy_engine.analysis import event_name_filter, field_path


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
