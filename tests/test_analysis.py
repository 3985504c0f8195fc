from __future__ import annotations

import pytest

from policy_engine.cel import analysis
from policy_engine.cel.analysis import (
    conjuncts,
    event_name_filter,
    field_path,
    names_read,
    operands_reading_only,
    reads_field,
)
from policy_engine.compiler.pipeline import compile_text
from policy_engine.core.engine import Engine, conn_context, event_context

# A comment with an apostrophe once hid everything after it from a scan of the text.
COMMENTED_OR = 'event.name == "a" && conn.ip != "" // it\'s for b\n|| event.name == "b"'


@pytest.mark.parametrize(
    ("source", "names", "rest"),
    [
        ('event.name == "a"', {"a"}, None),
        ("event.name == 'a'", {"a"}, None),
        ('"a" == event.name', {"a"}, None),
        ('event.name in ["a", "b"]', {"a", "b"}, None),
        ('event.name == "a" || event.name in ["b", "c"]', {"a", "b", "c"}, None),
        ('event.name == "a" // it\'s for b\n|| event.name == "b"', {"a", "b"}, None),
        ("(event.name == r'a\\d')", {"a\\d"}, None),
        ("event.name == '''it's'''", {"it's"}, None),
        ('event.name == "a" && claims.role == "x"', {"a"}, 'claims.role == "x"'),
        ('event.name == "a" && (x || y)', {"a"}, "(x || y)"),
        ('event.name == "a" && b && c', {"a"}, "b && c"),
        ('event.name == "a" && x // it\'s\n&& y', {"a"}, "x // it's\n&& y"),
        ('(event.name == "a" || event.name == "b") && x', {"a", "b"}, "x"),
        ('event.name == "a" && true', {"a"}, "true"),
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
        COMMENTED_OR,
        'event.name != "a"',
        'event.name == "a" ? true : false',
        'claims.role == "x" && event.name == "a"',
        'event.name == "a" + "b"',
        'event.name.startsWith("a")',
        'event.name in ["a", 1]',
        'event.name == b"a"',
        'event.name == "a" &&',  # does not parse
    ],
)
def test_anything_else_is_left_to_evaluation(source: str) -> None:
    assert event_name_filter(source) == (None, None)


@pytest.mark.parametrize(
    ("source", "names", "rest"),
    [
        ('event.name == "a&&b" && conn.ip == "||"', {"a&&b"}, 'conn.ip == "||"'),
        ('event.name == "a" && "event.name" != conn.ip', {"a"}, '"event.name" != conn.ip'),
        ('event.name == """x " && y""" && z', {'x " && y'}, "z"),
    ],
)
def test_operators_inside_strings_do_not_split_the_expression(
    source: str, names: set[str], rest: str
) -> None:
    assert event_name_filter(source) == (frozenset(names), rest)


def test_a_string_that_mentions_the_event_name_is_not_a_name_test() -> None:
    assert event_name_filter('"event.name" == "a" && x') == (None, None)


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ("conn.sid", ("conn", "sid")),
        (" conn.ip ", ("conn", "ip")),
        ("conn.ip // the address\n", ("conn", "ip")),
        ("conn.ip + 'x'", None),
        ('conn["ip"]', None),
        ("conn.ip.x", None),
    ],
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
        ("(a && b)", ["a", "b"]),
        ("a || b && c", None),  # || binds looser: b && c is not required
        ("a && b ? c : d", None),
        ("a && b // it's\n|| c", None),
        ("a // it's\n&& b", ["a", "b"]),
        # A triple-quoted string may hold a lone quote; a raw string's backslash escapes
        # nothing: neither may hide (or invent) an operator.
        ("'''it's''' == event.name || event.name == '''it's''' && load.x > 1", None),
        ('"""x " y""" == z && w', ['"""x " y""" == z', "w"]),
        ('r"a\\" == x && y', ['r"a\\" == x', "y"]),
        ('"a\\" && b" == x && y', ['"a\\" && b" == x', "y"]),
        ("a &&", None),  # does not parse
        ("a == true && false", ["a == true", "false"]),  # literals that lex as names
    ],
)
def test_conjuncts_are_the_operands_every_one_of_which_must_hold(
    source: str, parts: list[str] | None
) -> None:
    assert conjuncts(source) == parts


@pytest.mark.parametrize(
    ("source", "parts"),
    [
        (
            'load.lag > 300 && event.priority == "normal" && load.mem > 1',
            ["load.lag > 300", "load.mem > 1"],
        ),
        ("load.x > 1 // it's\n&& claims.admin == true", ["load.x > 1"]),
        ("conn.tags.all(load, load != '') && load.x > 1", ["load.x > 1"]),
        ("[1].all(conn, conn > 0) && true", ["[1].all(conn, conn > 0)", "true"]),
        ("claims.admin && load.x > 1 || load.y > 1", None),
    ],
)
def test_the_operands_that_read_only_some_variables(source: str, parts: list[str] | None) -> None:
    assert operands_reading_only(source, {"load"}) == parts


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
        ("conn.tags.all(t, t != load.x)", {"conn", "load"}),  # nor a comprehension's variable
        ("[1].all(load, load > 0) && load.x > 1", {"load"}),  # shadowed inside, read outside
        ("load.x > 1 // it's\n&& claims.admin == true", {"load", "claims"}),
        ("load.x > 1 // claims, conn", {"load"}),  # nor anything in a comment
        ("load.x >", set()),  # a source that does not parse never runs
    ],
)
def test_the_names_an_expression_reads(source: str, names: set[str]) -> None:
    assert names_read(source) == names


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ("conn.connected_ms > 1000", True),
        ('conn["connected_ms"] > 1000', True),
        ("has(conn.connected_ms)", True),
        ("conn[claims.field] > 0", True),  # a computed key may be any field
        ("[conn].size() > 0", True),  # the whole message
        ("conn.sid != '' // not conn.connected_ms", False),
        ("'conn.connected_ms' == conn.sid", False),
        ("event.payload.connected_ms > 1", False),
        ("[{'connected_ms': 1}].all(conn, conn.connected_ms > 0)", False),
        ("conn.connected_ms >", True),  # does not parse: may read anything
    ],
)
def test_whether_an_expression_reads_a_field(source: str, reads: bool) -> None:
    assert reads_field(source, "conn", "connected_ms") is reads


def policy_text(name: str, when: str) -> str:
    indented = "\n".join(f"        {line}" for line in when.splitlines())
    return (
        "version: 1\nauthorization:\n  rules:\n"
        f"    - name: {name}\n      hook: event\n      effect: deny\n"
        f"      when: |-\n{indented}\n"
    )


@pytest.mark.parametrize(
    ("when", "refused"),
    [
        ('event.name == "a" // it\'s for b too\n|| event.name == "b"', {"a", "b"}),
        (COMMENTED_OR, {"a", "b"}),
        ('event.name == "a" && "it\'s" != "" // but b\'s fine', {"a"}),
    ],
)
async def test_a_rule_applies_to_every_event_its_condition_names_whatever_its_comments_say(
    when: str, refused: set[str]
) -> None:
    policy = compile_text(policy_text("deny-some", when)).policy
    plans = policy.event_plans
    assert {name for name in "abc" if plans[name].authorization} >= refused
    engine = Engine(policy, None)
    conn = conn_context(sid="s1", ip="192.0.2.1", conversation_id="c1")
    for name in "abc":
        decision = await engine.on_event(conn, {}, event_context(name))
        assert decision.allowed is (name not in refused), name


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ('conn.ip == "x"', False),
        ("conn . ip != ''", False),
        ("load.loop_lag_ms > 1", False),
        ("conn.connected_ms > 5", True),
        ('conn["connected_ms"] > 1', True),
        ("has(conn.connected_ms)", True),
        ("conn[k] > 1", True),  # a computed key may be any field
        ("[conn].size() > 0", True),  # the whole record used as a value
        ("conn.ip == 'a' // connected_ms in a comment", False),
    ],
)
def test_a_field_read_is_found_without_misreading_text(source, reads):
    assert reads_field(source, "conn", "connected_ms") is reads


@pytest.mark.parametrize(
    ("source", "keys"),
    [
        ('event.payload.cmd.matches("rm")', {"cmd"}),
        ('has(event.payload.x) && event.payload["y"] == 1', {"x", "y"}),
        ('event.payload.tags.exists(t, t == "admin")', {"tags"}),
        ("event.payload.a.b.c == 1", {"a"}),
        ('event.name == "x"', set()),
        ("size(event.payload) > 1", None),
        ('event.payload.exists(k, k == "a")', None),
        ("event.payload[event.name] == 1", None),
        ("event == {}", None),
    ],
)
def test_fields_read_under_names_the_payload_keys_selected(
    source: str, keys: set[str] | None
) -> None:
    found = analysis.fields_read_under(source, "event", "payload")
    assert found == (None if keys is None else frozenset(keys))


def test_comprehensions_over_finds_the_client_lists_iterated() -> None:
    source = (
        'event.payload.tags.exists(t, t == "a") || [1, 2].all(n, n > 0)'
        ' || event.payload.all(k, k != "")'
    )
    found = analysis.comprehensions_over(source, "event", "payload")
    assert [(key, macro) for key, macro, _ in found] == [("tags", "exists"), ("", "all")]
