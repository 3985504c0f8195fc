"""The fast path against cel-expr-python, the engine whose answers it must give exactly."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cel import CONTEXT, CORPUS, EVERYTHING, RAISES

from policy_engine import cel
from policy_engine.cel import fastpath
from policy_engine.errors import EvaluationError
from policy_engine.language.contexts import CONN, EVENT, HOOK_VARIABLES, RAW_ERROR, Hook

pytestmark = pytest.mark.skipif(
    cel.CEL_EXPR_PYTHON not in cel.available_backends(), reason="needs cel-expr-python"
)


@cache
def reference(source: str, expect: str = "dyn") -> cel.CompiledProgram:
    return cel.get_backend(cel.CEL_EXPR_PYTHON, fast_path=False).compile(
        source, EVERYTHING, expect=expect
    )


@cache
def fast(source: str, expect: str = "dyn") -> Callable[[Mapping[str, Any]], Any]:
    closure = fastpath.compile_fast(source, EVERYTHING, expect=expect)
    assert closure is not None, f"{source!r} should be in the subset"
    return closure


def run(evaluate: Callable[[Mapping[str, Any]], Any], activation: Mapping[str, Any]) -> Any:
    try:
        return typed(evaluate(activation))
    except EvaluationError:
        return RAISES


def typed(value: Any) -> Any:
    """Values with their types, so that True never passes for 1, and nan and -0.0 compare."""
    if isinstance(value, list):
        return ("list", [typed(item) for item in value])
    if isinstance(value, dict):
        return ("map", {key: typed(item) for key, item in value.items()})
    if isinstance(value, float):
        return ("double", repr(value))
    return (type(value).__name__, value)


def agree(source: str, activation: Mapping[str, Any], expect: str = "dyn") -> tuple[Any, Any]:
    """Both outcomes, fast path first, for an assertion that shows them side by side."""
    return (
        run(fast(source, expect), activation),
        run(reference(source, expect).evaluate, activation),
    )


def disagreements(
    expressions: list[tuple[str, str]], activation: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    found = []
    for source, expect in expressions:
        mine, theirs = agree(source, activation, expect)
        if mine != theirs:
            found.append((source, mine, theirs))
    return found


# --- contexts --------------------------------------------------------------------------------

ODD_CLAIMS: dict[str, Any] = {
    "sub": 42,
    "role": ["admin"],
    "roles": "admin",
    "tier": None,
    "exp": 1700000000.0,
    "org": "o-1",
    "admin": 1,
    "level": True,
}
CONTEXTS: dict[str, dict[str, Any]] = {
    "base": CONTEXT,
    "odd-claims": CONTEXT | {"claims": ODD_CLAIMS},
    "empty": CONTEXT
    | {"claims": {}, "event": CONTEXT["event"] | {"payload": None, "has_ack": False}},
    "bare": {
        "conn": CONN.defaults(),
        "claims": {"role": "viewer", "admin": True, "level": 2, "roles": [], "exp": 2.5},
        "event": EVENT.defaults() | {"payload": {"x": 3.0, "items": [2.0], "meta": {}}},
        "load": CONTEXT["load"] | {"loop_lag_ms": 250},
        "error": RAW_ERROR.defaults() | {"type": "A", "status": 404, "types": ["A"]},
    },
    "missing": {k: v for k, v in CONTEXT.items() if k not in ("claims", "event")},
}

# --- the corpus ------------------------------------------------------------------------------

FAST_CORPUS: list[str] = [
    # typed fields
    'conn.ip == "10.0.0.7"',
    'conn.ip != "10.0.0.7"',
    'conn.ip.startsWith("10.")',
    'conn.origin.endsWith(".example.com")',
    'conn.user_agent.contains("Linux")',
    'conn.ip in ["10.0.0.8", "10.0.0.7"]',
    'conn.transport == "polling" || conn.transport == "websocket"',
    "size(conn.headers) == 2",
    "conn.headers.size() > 1",
    '"authorization" in conn.headers',
    'conn.headers["x-forwarded-for"]',
    'conn.headers["missing"] == "x"',
    'conn.query.v == "2"',
    "has(conn.query.token)",
    "has(conn.query.nope)",
    "has(conn.ip)",
    'conn.auth_failures >= 3 ? "block" : "allow"',
    'conn.user_id + ":" + conn.conversation_id',
    "conn.auth_failures > 1 && conn.priority <= 1",
    "conn.priority in [1, 2]",
    "load.loop_lag_ms > 200 || load.active_connections > 10000",
    "load.cpu_percent >= 63 && load.memory_mb < 1024",
    'event.name == "oh_user_action" && event.size_bytes < 1048576',
    'event.priority == "high" && !event.has_ack',
    '!(event.name == "telemetry")',
    "event.has_ack == true",
    'event.name in ["a", "b"] || event.size_bytes > 1024',
    'error.type in ["TimeoutError", "ConnectionError"]',
    'error.type in ["A", "B"] || error.status == 404',
    '"OSError" in error.types',
    "error.status >= 500 && error.status < 600",
    'error.module + "." + error.type',
    "error.types[0]",
    "error.types[5]",
    'error.status == 404 ? "not_found" : error.type',
    "size(error.types) > 2",
    '"abc" < "abd"',
    'size("héllo")',
    r'"a\tb\u00e9\x41\101" == "a	béAA"',
    "true",
    "null == null",
    'true || conn.headers["missing"] == "x"',
    'conn.headers["missing"] == "x" || true',
    'conn.headers["missing"] == "x" && false',
    # claims and payloads: dyn at run time
    'has(claims.role) && claims.role == "admin"',
    'has(claims.role) && claims.role == "viewer"',
    'claims.role == "admin"',
    'claims.role != "admin"',
    "claims.org.id",
    "has(claims.org.id)",
    'claims["tier"] != "free" && conn.auth_failures > 1',
    '"admin" in claims.roles',
    'claims.role in ["admin", "ops"]',
    "claims.exp > 1600000000",
    "claims.exp >= 1.7e9",
    "claims.exp == 1700000000.0",
    "claims.exp in [1700000000, 1]",
    "claims.level < 3 || claims.admin",
    "claims.admin == true",
    "claims.admin",
    "!claims.admin",
    "!!claims.admin",
    "claims.admin ? 1 : 2",
    "claims.roles[0]",
    'claims.roles[0] == "admin"',
    "claims.roles[-1]",
    "size(claims.roles) > 1",
    "claims.roles.size()",
    "claims.sub == conn.user_id",
    'claims.sub.startsWith("u-")',
    'claims.sub + ":" + conn.ip',
    'claims.roles == ["admin", "ops"]',
    "claims.missing == null",
    'claims.tier < "q"',
    "claims.org == claims.org",
    "has(event.payload.x) && event.payload.x == 3",
    "event.payload.x == 3",
    "event.payload.x > 2.5",
    "event.payload.items[1] == 2",
    'event.payload.meta.lang in ["en", "de"]',
    '"lang" in event.payload.meta',
    "event.payload.tags == event.payload.tags",
    "size(event.payload) > 2",
    "has(event.payload.missing)",
    "event.payload.nope.deeper",
    'event.payload.x + "a"',
    "event.payload.items[10]",
    "3 in event.payload.items",
]


def test_corpus_is_large_and_fails_somewhere() -> None:
    assert len(FAST_CORPUS) >= 60
    base = CONTEXTS["base"]
    failing = [s for s in FAST_CORPUS if run(reference(s).evaluate, base) is RAISES]
    assert len(failing) >= 5


@pytest.mark.parametrize("context", CONTEXTS, ids=list(CONTEXTS))
@pytest.mark.parametrize("source", FAST_CORPUS)
def test_corpus_gives_cel_expr_pythons_outcome(source: str, context: str) -> None:
    fast_outcome, reference_outcome = agree(source, CONTEXTS[context])
    assert fast_outcome == reference_outcome


IN_SUBSET = [s for s, _ in CORPUS if fastpath.compile_fast(s, EVERYTHING, expect="dyn")]


@pytest.mark.parametrize("source", IN_SUBSET, ids=IN_SUBSET)
def test_adapter_corpus_agrees_wherever_it_is_in_the_subset(source: str) -> None:
    closure = fastpath.compile_fast(source, EVERYTHING, expect="dyn")
    assert closure is not None
    assert run(closure, CONTEXT) == run(reference(source).evaluate, CONTEXT)


def test_most_of_the_adapter_corpus_outside_macros_and_arithmetic_is_in_the_subset() -> None:
    assert len(IN_SUBSET) >= 30


# --- behaviour worth pinning -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "claims", "value"),
    [
        ("claims.a == 1", {"a": 1.0}, True),
        ("claims.a == 1", {"a": True}, False),
        ("claims.a == true", {"a": 1}, False),
        ('claims.a == "1"', {"a": 1}, False),
        ("claims.a == [1]", {"a": [1.0]}, True),
        ("claims.a == [1]", {"a": [True]}, False),
        ("claims.a == claims.a", {"a": [float("nan")]}, False),
        ("claims.a != claims.a", {"a": {"k": float("nan")}}, True),
        ("claims.a == 9007199254740992.0", {"a": 9007199254740993}, True),
        ("claims.a < claims.b", {"a": 2**63 - 1, "b": 2.0**63}, False),
        ("claims.a > claims.b", {"a": 2**63, "b": 2**63 - 1}, True),
        ("claims.a == claims.b", {"a": -0.0, "b": 0}, True),
        ("claims.a >= claims.b", {"a": 1, "b": float("nan")}, False),
        ("claims.a < true", {"a": False}, True),
        ("claims.a < 1", {"a": True}, RAISES),
        ("claims.a < 1", {"a": "0"}, RAISES),
        ("claims.a < claims.a", {"a": None}, RAISES),
        ("claims.a < claims.a", {"a": [1]}, RAISES),
        ('claims.a < "z"', {"a": "é"}, False),
        ("claims.a && false", {"a": "s"}, False),
        ("false && claims.a", {"a": "s"}, False),
        ("claims.a && true", {"a": "s"}, RAISES),
        ("claims.a || true", {"a": "s"}, True),
        ("claims.a || claims.b", {"b": True}, True),
        ("claims.a && claims.b", {"a": 1}, RAISES),
        ("!!claims.a", {"a": 0}, 0),
        ("!(!claims.a)", {"a": 0}, RAISES),
        ("!!!claims.a", {"a": True}, False),
        ("claims.a ? 1 : 2", {"a": None}, RAISES),
        ("has(claims.a.b)", {"a": "s"}, RAISES),
        ("has(claims.a.b)", {"a": {"b": None}}, True),
        ("has(claims.a.b)", {}, RAISES),
        ('claims.a["b"]', {"a": ["b"]}, RAISES),
        ("claims.a[0]", {"a": "abc"}, RAISES),
        ("claims.a[0]", {"a": {"0": 1}}, RAISES),
        ('"a" in claims.a', {"a": "abc"}, RAISES),
        ("1 in claims.a", {"a": {"1": 1}}, False),
        ("1 in claims.a", {"a": [1.0, "a"]}, True),
        ("claims.b in claims.a", {"a": {"k": 1}, "b": None}, RAISES),
        ("claims.b in claims.a", {"a": {"k": 1}, "b": True}, False),
        ('claims.b in ["a", 1]', {"b": 1.0}, True),
        ('claims.b in ["a", 1]', {"b": True}, False),
        ("size(claims.a)", {"a": 1}, RAISES),
        ('claims.a.startsWith("a")', {"a": ["a"]}, RAISES),
        ('claims.a + "a"', {"a": 1}, RAISES),
        ("claims.a", {"a": 2**63}, 2**63),
    ],
)
def test_surprising_cel_behaviour_is_pinned_and_matched(
    source: str, claims: dict[str, Any], value: Any
) -> None:
    expected = RAISES if value is RAISES else typed(value)
    assert agree(source, {"claims": claims}) == (expected, expected)


def test_dyn_result_of_the_wrong_type_raises_like_the_engine() -> None:
    activation = {"claims": {"role": "admin", "level": True}}
    for source, expect in [
        ("claims.role", "bool"),
        ("claims.level", "int"),
        ("claims.level", "string"),
    ]:
        assert agree(source, activation, expect) == (RAISES, RAISES)
    with pytest.raises(EvaluationError, match="string, not a bool"):
        fast("claims.role", "bool")(activation)
    assert agree("claims.role", activation, "string") == (("str", "admin"),) * 2


def test_missing_variable_is_an_error_that_logic_can_absorb() -> None:
    activation = {"load": CONTEXT["load"]}
    assert agree('conn.ip == "x"', activation) == (RAISES, RAISES)
    assert agree('true || conn.ip == "x"', activation) == (("bool", True),) * 2
    assert agree('conn.ip == "x" && false', activation) == (("bool", False),) * 2


def test_outside_plain_json_the_engine_fails_every_read_of_the_variable() -> None:
    """cel-expr-python converts all of ``event`` on first read; the closures read one field.

    Pinned so that a change in either shows here; callers keep both in agreement by
    checking values with ``fits_fast_path``.
    """
    event = CONTEXT["event"] | {"payload": {"huge": 2**64}}
    activation = {"event": event}
    assert not fastpath.fits_fast_path(event)
    assert agree('event.name == "oh_user_action"', activation) == (("bool", True), RAISES)


def test_outside_plain_json_the_engine_cuts_strings_at_nul() -> None:
    claims = {"role": "admin\x00-not", "sub\x00x": "u-1"}
    assert not fastpath.fits_fast_path(claims)
    assert agree('claims.role == "admin"', {"claims": claims}) == (("bool", False), ("bool", True))
    assert agree("has(claims.sub)", {"claims": claims}) == (("bool", False), ("bool", True))


# --- hypothesis: random claims and payloads --------------------------------------------------

NUMBERS = (
    st.sampled_from([0, 1, -1, 3, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)])
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from([0.0, -0.0, 1.0, 3.0, 1.5, 2.0**53, 2.0**63, float("nan"), float("inf")])
    | st.floats()
)
# Plain JSON (fits_fast_path): cel-expr-python cuts strings at NUL, see the pinned tests.
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4)
KEYS = st.sampled_from(["role", "roles", "org", "id", "level", "admin", "sub", "x", "lang"])
SCALARS = (
    st.none()
    | st.booleans()
    | NUMBERS
    | st.sampled_from(["admin", "viewer", "ops", "", "u-42", "1", "a"])
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | TEXT, inner),
    max_leaves=8,
)
CLAIMS = st.dictionaries(KEYS, JSON, max_size=6)

DYN_EXPRESSIONS: list[tuple[str, str]] = [
    ('has(claims.role) && claims.role == "viewer"', "bool"),
    ('claims.role == "admin" || claims.role == "ops"', "bool"),
    ('claims.role in ["admin", "ops"]', "bool"),
    ('"admin" in claims.roles', "bool"),
    ("claims.roles == claims.org", "bool"),
    ("claims.level == 1", "bool"),
    ("claims.level != 3.0", "bool"),
    ("claims.level > 2", "bool"),
    ("claims.level <= 9007199254740993", "bool"),
    ("claims.level >= claims.x", "bool"),
    ("claims.level < claims.x", "bool"),
    ("claims.level == claims.x", "bool"),
    ("claims.level in claims.roles", "bool"),
    ("claims.x in claims.org", "bool"),
    ("claims.level in [1, 2.5, true, null]", "bool"),
    ("claims.admin", "bool"),
    ("claims.admin == true", "bool"),
    ("!claims.admin", "bool"),
    ("!!claims.admin", "dyn"),
    ("claims.admin && claims.level > 1", "bool"),
    ("claims.admin || claims.level > 1", "bool"),
    ('claims.admin ? claims.role : "none"', "dyn"),
    ("has(claims.org.id)", "bool"),
    ('has(claims.org) && claims.org.id == "o-1"', "bool"),
    ("claims.org.id", "dyn"),
    ('claims["sub"]', "string"),
    ("claims.roles[0]", "dyn"),
    ("claims.roles[1] == claims.role", "bool"),
    ("size(claims.roles)", "int"),
    ("claims.role.size() > 1", "bool"),
    ('claims.role.startsWith("a")', "bool"),
    ("claims.role.contains(claims.sub)", "bool"),
    ('claims.sub + ":" + conn.ip', "string"),
    ('claims.sub < "m"', "bool"),
    ("claims.level", "int"),
    ("claims.role", "string"),
    ("claims.x == null", "bool"),
    ("event.payload.x == 3", "bool"),
    ('has(event.payload.lang) && event.payload.lang in ["en", "de"]', "bool"),
    ("event.payload == claims.org", "bool"),
    ("size(event.payload) > 1", "bool"),
    ('event.name == "a" && event.payload.x > 1', "bool"),
]


def test_every_random_expression_is_in_the_subset() -> None:
    for source, expect in DYN_EXPRESSIONS:
        fast(source, expect)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CLAIMS, JSON)
def test_random_claims_and_payloads_give_the_engines_outcome(
    claims: dict[str, Any], payload: Any
) -> None:
    activation = CONTEXT | {"claims": claims, "event": CONTEXT["event"] | {"payload": payload}}
    assert disagreements(DYN_EXPRESSIONS, activation) == []


@settings(max_examples=400, deadline=None)
@given(NUMBERS | st.booleans() | st.none(), NUMBERS | st.booleans() | TEXT)
def test_numbers_compare_like_the_engine(left: Any, right: Any) -> None:
    activation = {"claims": {"a": left, "b": right, "l": [right], "m": {"k": right}}}
    expressions = [
        *((f"claims.a {symbol} claims.b", "dyn") for symbol in ("==", "!=", "<", "<=", ">", ">=")),
        ("claims.a in claims.l", "dyn"),
        ('claims.a in [0, 1, -1, 1.5, 9007199254740993, true, null, "a"]', "dyn"),
        ("claims.m.k == claims.a", "dyn"),
    ]
    assert disagreements(expressions, activation) == []


OPERANDS = st.sampled_from(
    [
        *("claims.role", "claims.level", "claims.admin", "claims.roles", "claims.org"),
        *("claims.org.id", "claims['sub']", "claims.roles[0]", "event.payload"),
        *("event.payload.x", "conn.ip", "conn.auth_failures", "event.has_ack"),
        *("load.loop_lag_ms", "error.types", "conn.headers", "'admin'", r"'a\tb'", "1"),
        *("-1", "2.5", "true", "false", "null", "[1, 'a', true]", "['admin', 'ops']"),
        *("9223372036854775807", "has(claims.role)", "has(claims.org.id)", "has(conn.ip)"),
    ]
)
BINARY = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "&&", "||", "+"])
EXPRESSIONS = st.recursive(
    OPERANDS,
    lambda inner: (
        st.tuples(inner, BINARY, inner).map("({0[0]} {0[1]} {0[2]})".format)
        | st.tuples(inner, inner, inner).map("({0[0]} ? {0[1]} : {0[2]})".format)
        | inner.map("!{}".format)
        | inner.map("!!{}".format)
        | inner.map("size({})".format)
        | st.tuples(inner, st.sampled_from(["startsWith", "endsWith", "contains"]), inner).map(
            "{0[0]}.{0[1]}({0[2]})".format
        )
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EXPRESSIONS, st.sampled_from(["dyn", "bool"]), CLAIMS, JSON)
def test_random_expressions_the_engine_accepts_agree(
    source: str, expect: str, claims: dict[str, Any], payload: Any
) -> None:
    try:
        program = reference(source, expect)
    except cel.CelCompileError:
        return  # a type error: never handed to the fast path
    closure = fastpath.compile_fast(source, EVERYTHING, expect=expect)
    if closure is None:
        return  # arithmetic on dyn operands
    activation = CONTEXT | {"claims": claims, "event": CONTEXT["event"] | {"payload": payload}}
    assert run(closure, activation) == run(program.evaluate, activation)


ESCAPES = [
    "a",
    "é",
    "😀",
    " ",
    "\\n",
    "\\t",
    "\\\\",
    '\\"',
    "\\'",
    "\\x41",
    "\\xff",
    "\\u00e9",
    "\\U0001F600",
    "\\101",
    "\\377",
    "\\`",
    "\\?",
    "\\a",
    "\\v",
    "\\b",
    "\\f",
    "\\r",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(ESCAPES), max_size=8),
    st.sampled_from(['"', "'", '"""', "'''"]),
    st.booleans(),
)
def test_string_literals_read_like_the_engine(pieces: list[str], quote: str, raw: bool) -> None:
    source = f"{'r' if raw else ''}{quote}{''.join(pieces)}{quote}"
    try:
        program = cel.get_backend(cel.CEL_EXPR_PYTHON, fast_path=False).compile(
            source, {}, expect="string"
        )
    except cel.CelCompileError:
        return  # not a literal the engine accepts, so never handed to the fast path
    closure = fastpath.compile_fast(source, {}, expect="string")
    if not raw:
        assert closure is not None, source
    if closure is not None:
        assert closure({}) == program.evaluate({}), source


# --- outside the subset ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        'claims.roles.exists(r, r == "ops")',
        "claims.roles.all(r, r.size() > 2)",
        "event.payload.items.exists_one(i, i == 4)",
        "event.payload.items.map(i, i * 2)",
        "event.payload.items.filter(i, i > 1)",
        'conn.ip.matches("^10[.]")',
        'matches(conn.ip, "^10[.]")',
        'timestamp("2024-01-01T00:00:00Z") < timestamp("2025-01-01T00:00:00Z")',
        'duration("1s") > duration("0s")',
        "load.loop_lag_ms + 1 > 200",
        "load.loop_lag_ms - 1 > 200",
        "load.loop_lag_ms * 2 > 200",
        "load.loop_lag_ms / 2 > 200",
        "load.loop_lag_ms % 2 == 0",
        "-load.loop_lag_ms < 0",
        "double(load.cpu_percent) > 0.5",
        "string(conn.auth_failures) == '2'",
        'int("42") == 42',
        "type(claims.role) == string",
        "dyn(conn.ip) == conn.ip",
        '{"a": 1}.a == 1',
        '[conn.ip, conn.user_id] == ["a", "b"]',
        'conn.ip in [conn.user_id, "x"]',
        "1u == claims.x",
        'b"abc" == claims.x',
        "claims.roles + ['x'] == claims.roles",
        "claims.a + claims.b",
        "conn",
        "size(conn) > 0",
        "has((claims.role))",
        ".conn.ip == 'x'",
        "unknown.field == 1",
        "1e999 > claims.x",
        "claims.x == '''a\r\nb'''",
        "claims[claims.k] == 1",
    ],
)
def test_constructs_outside_the_subset_are_left_to_cel(source: str) -> None:
    assert fastpath.compile_fast(source, EVERYTHING, expect="dyn") is None


def test_static_result_of_another_type_is_left_to_cel() -> None:
    assert fastpath.compile_fast("conn.ip", EVERYTHING, expect="bool") is None


def test_unknown_expectation_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="expect"):
        fastpath.compile_fast("true", EVERYTHING, expect="list")


def test_hook_variables_compile_for_their_usual_conditions() -> None:
    variables = HOOK_VARIABLES[Hook.ERROR]
    closure = fastpath.compile_fast(
        'hook == "event" && error.status >= 500', variables, expect="bool"
    )
    assert closure is not None
    assert closure({"hook": "event", "error": CONTEXT["error"]}) is True


# --- the domain --------------------------------------------------------------------------------

ANYTHING = st.recursive(
    SCALARS
    | st.integers()
    | st.binary(max_size=2)
    | st.characters(categories=["Cs"])
    | st.tuples(st.integers(0, 3)),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=2) | st.integers(0, 3) | st.none(), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(ANYTHING)
def test_values_fitting_the_fast_path_reach_the_engine_unchanged(value: Any) -> None:
    if fastpath.fits_fast_path(value):
        seen = run(reference("claims.k").evaluate, {"claims": {"k": value}})
        assert seen == typed(value)


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**63) - 1, "\ud800", (1, 2), {1.5: 1}, {"k": [2**64]}, {"\udc00": 1}],
)
def test_values_the_engine_refuses_do_not_fit(value: Any) -> None:
    assert not fastpath.fits_fast_path(value)
    assert run(reference("has(claims.k)").evaluate, {"claims": {"k": value}}) is RAISES


def test_plain_json_fits() -> None:
    assert fastpath.fits_fast_path(CONTEXT["event"] | {"payload": {"a": [1, 2.5, None, "é"]}})


def test_evaluator_of_a_fast_program_is_its_closure_with_the_same_answers() -> None:
    backend = cel.get_backend(cel.CEL_EXPR_PYTHON)
    inside = backend.compile('has(claims.role) && claims.role == "viewer"', EVERYTHING)
    outside = backend.compile('claims.role.matches("^v")', EVERYTHING)
    assert cel.evaluator_of(inside) is not inside.evaluate  # the closure, one call fewer
    assert cel.evaluator_of(outside) == outside.evaluate
    for claims in [{"role": "viewer"}, {"role": "editor"}, {}, {"role": 3}]:
        for program in (inside, outside):
            activation = {"claims": claims}
            assert run(cel.evaluator_of(program), activation) == run(program.evaluate, activation)
