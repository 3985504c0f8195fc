from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import pytest

from policy_engine import cel
from policy_engine.cel.descriptors import descriptor_pool_for
from policy_engine.errors import EvaluationError, PolicyEngineError
from policy_engine.language.contexts import (
    CLAIMS,
    CONN,
    EVENT,
    HOOK_VARIABLES,
    LOAD,
    RAW_ERROR,
    Hook,
    MessageType,
    Variable,
)

BACKENDS = cel.available_backends()
BOTH = pytest.mark.skipif(
    len(BACKENDS) < 2, reason="needs both cel-expr-python and cel-python installed"
)
CONNECT = HOOK_VARIABLES[Hook.CONNECT]
EVENT_HOOK = HOOK_VARIABLES[Hook.EVENT]
EVERYTHING: Mapping[str, Variable] = {
    "conn": CONN,
    "claims": CLAIMS,
    "event": EVENT,
    "load": LOAD,
    "error": RAW_ERROR,
}

CONTEXT: dict[str, Any] = {
    "conn": CONN.defaults()
    | {
        "sid": "s-1",
        "namespace": "/",
        "ip": "10.0.0.7",
        "user_id": "u-42",
        "conversation_id": "c-7",
        "transport": "websocket",
        "origin": "https://app.example.com",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        "headers": {"x-forwarded-for": "203.0.113.9", "authorization": "Bearer abc"},
        "query": {"token": "t", "v": "2"},
        "auth_failures": 2,
        "connected_ms": 1500,
        "priority": 1,
    },
    "claims": {
        "sub": "u-42",
        "role": "admin",
        "roles": ["admin", "ops"],
        "tier": "pro",
        "exp": 1700000000,
        "org": {"id": "o-1"},
    },
    "event": EVENT.defaults()
    | {
        "name": "oh_user_action",
        "size_bytes": 2048,
        "priority": "high",
        "has_ack": True,
        "payload": {
            "action": "message",
            "x": 3,
            "items": [1, 2, 3, 4],
            "meta": {"lang": "en"},
            "tags": ["alpha", "beta"],
        },
    },
    "load": LOAD.defaults()
    | {"active_connections": 420, "loop_lag_ms": 35, "events_per_second": 900, "cpu_percent": 63},
    "error": RAW_ERROR.defaults()
    | {
        "type": "TimeoutError",
        "types": ["TimeoutError", "OSError", "Exception"],
        "module": "asyncio",
        "message": "timed out after 5s",
        "status": 504,
        "hook": "event",
    },
}


class Raises:
    """The expected outcome of an expression that must fail at evaluation."""

    def __repr__(self) -> str:
        return "RAISES"


RAISES = Raises()

CORPUS: list[tuple[str, Any]] = [
    ('conn.ip == "10.0.0.7"', True),
    ('conn.ip.startsWith("10.")', True),
    ('conn.ip in ["10.0.0.8", "10.0.0.7"]', True),
    ('conn.origin.endsWith(".example.com")', True),
    ('conn.user_agent.contains("Linux")', True),
    (r'conn.ip.matches("^10\\.0\\.")', True),
    ('conn.ip.matches("^192[.]")', False),
    ('matches(conn.user_agent, "Mozilla/[0-9]+")', True),
    ("size(conn.headers) == 2", True),
    ('"authorization" in conn.headers', True),
    ('conn.headers["x-forwarded-for"]', "203.0.113.9"),
    ('conn.query.v == "2"', True),
    ("has(conn.query.token)", True),
    ("has(claims.missing)", False),
    ('has(claims.role) && claims.role == "admin"', True),
    ('claims.roles.exists(r, r == "ops")', True),
    ("claims.roles.all(r, r.size() > 2)", True),
    ("claims.org.id", "o-1"),
    ('claims["tier"] != "free" && conn.auth_failures > 1', True),
    ('claims.roles.map(r, r + "!")', ["admin!", "ops!"]),
    ('conn.auth_failures >= 3 ? "block" : "allow"', "allow"),
    ('conn.user_id + ":" + conn.conversation_id', "u-42:c-7"),
    ("conn.connected_ms / 1000", 1),
    ("conn.connected_ms % 7", 2),
    ("-conn.priority", -1),
    ("load.loop_lag_ms > 200 || load.active_connections > 10000", False),
    ("load.loop_lag_ms * 2 + load.cpu_percent", 133),
    ("load.cpu_percent - 100", -37),
    ("double(load.cpu_percent) / 100.0", 0.63),
    ('event.name == "oh_user_action" && event.size_bytes < 1048576', True),
    ('event.priority == "high" && !event.has_ack', False),
    ("event.payload.x == 3", True),
    ("event.payload.x + 1", 4),
    ("event.payload.items.map(i, i * 2)", [2, 4, 6, 8]),
    ("event.payload.items.filter(i, i % 2 == 0)", [2, 4]),
    ("event.payload.items.exists_one(i, i == 4)", True),
    ("size(event.payload.items)", 4),
    ('event.payload.meta.lang in ["en", "de"]', True),
    ('event.payload.tags.exists(t, t.startsWith("b"))', True),
    ("has(event.payload.missing)", False),
    ('error.type in ["TimeoutError", "ConnectionError"]', True),
    ('error.types.exists(t, t == "OSError")', True),
    ("error.status >= 500 && error.status < 600", True),
    ('error.message.matches("timed out")', True),
    ('error.module + "." + error.type', "asyncio.TimeoutError"),
    ("[1, 2, 3].map(x, x * x)", [1, 4, 9]),
    ('{"a": 1, "b": 2}', {"a": 1, "b": 2}),
    ("[conn.ip, conn.user_id]", ["10.0.0.7", "u-42"]),
    ('string(conn.auth_failures) + "x"', "2x"),
    ('int("42") + 1', 43),
    ('size("héllo")', 5),
    ('"abc" < "abd"', True),
    ('true || conn.headers["missing"] == "x"', True),
    ('conn.headers["missing"] == "x" || true', True),
    ('conn.headers["missing"] == "x"', RAISES),
    ('claims.nope == "a"', RAISES),
    ("conn.auth_failures / 0", RAISES),
    ("event.payload.nope.deeper", RAISES),
    ("9223372036854775807 + conn.auth_failures", RAISES),
    ('event.payload.x + "a"', RAISES),
    ('int("abc")', RAISES),
    ('conn.ip.matches(conn.ip + "[")', RAISES),
    ("event.payload.items[10]", RAISES),
    ("claims.exp + claims.role", RAISES),
    ("claims.roles.all(r, r > 1)", RAISES),
]


def outcome(program: cel.CompiledProgram, activation: Mapping[str, Any]) -> Any:
    try:
        return typed(program.evaluate(activation))
    except EvaluationError:
        return RAISES


def typed(value: Any) -> Any:
    """Values with their types, so that True never passes for 1 nor 1.0 for 1."""
    if isinstance(value, list):
        return ("list", [typed(item) for item in value])
    if isinstance(value, dict):
        return ("map", {key: typed(item) for key, item in value.items()})
    return (type(value).__name__, value)


def expected(value: Any) -> Any:
    return RAISES if value is RAISES else typed(value)


# Each engine as the policy compiler gets it, and cel-expr-python alone (without the fast
# path), which still runs every expression outside the fast path's subset.
VARIANTS = [(name, True) for name in BACKENDS] + [
    (name, False) for name in BACKENDS if name == cel.CEL_EXPR_PYTHON
]


@pytest.fixture(params=VARIANTS, ids=lambda v: v[0] + ("" if v[1] else "-engine-only"))
def backend(request: pytest.FixtureRequest) -> cel.CelBackend:
    name, fast_path = request.param
    return cel.get_backend(name, fast_path=fast_path)


def compile_error(
    backend: cel.CelBackend,
    source: str,
    variables: Mapping[str, Variable] = CONNECT,
    expect: str = "bool",
) -> cel.CelCompileError:
    with pytest.raises(cel.CelCompileError) as caught:
        backend.compile(source, variables, expect=expect)
    return caught.value


# --- results -------------------------------------------------------------------------------


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40
    assert sum(value is RAISES for _, value in CORPUS) >= 10


@pytest.mark.parametrize(("source", "value"), CORPUS, ids=[source for source, _ in CORPUS])
def test_corpus_gives_expected_results(backend: cel.CelBackend, source: str, value: Any) -> None:
    program = backend.compile(source, EVERYTHING, expect="dyn")
    assert outcome(program, CONTEXT) == expected(value)


@BOTH
def test_engines_agree_on_every_corpus_expression() -> None:
    fast, fallback = cel.get_backend(cel.CEL_EXPR_PYTHON), cel.get_backend(cel.CEL_PYTHON)
    disagreements = []
    for source, _ in CORPUS:
        results = [
            outcome(engine.compile(source, EVERYTHING, expect="dyn"), CONTEXT)
            for engine in (fast, fallback)
        ]
        if results[0] != results[1]:
            disagreements.append((source, *results))
    assert disagreements == []


@BOTH
def test_engines_agree_on_variables_and_result_checks() -> None:
    fast, fallback = cel.get_backend(cel.CEL_EXPR_PYTHON), cel.get_backend(cel.CEL_PYTHON)
    for source, _ in CORPUS:
        first = fast.compile(source, EVERYTHING, expect="dyn")
        second = fallback.compile(source, EVERYTHING, expect="dyn")
        assert first.variables == second.variables, source


def test_checked_program_agrees_with_the_one_that_runs_on_dicts() -> None:
    """The C++ engine checks against protobuf messages but runs on dicts: the two must agree.

    Except where a number travels inside ``google.protobuf.Value`` (a dyn field as a message):
    JSON numbers there are doubles, so ``event.payload.x + 1`` fails on a message. Running on
    dicts keeps the payload's integers, which is one more reason to run on dicts.
    """
    if cel.CEL_EXPR_PYTHON not in BACKENDS:
        pytest.skip("cel-expr-python is not installed")
    from google.protobuf import json_format, message_factory

    backend = cel.get_backend(cel.CEL_EXPR_PYTHON)
    typed_env, _ = backend._environments_for(EVERYTHING)  # type: ignore[attr-defined]
    pool = descriptor_pool_for(v for v in EVERYTHING.values() if isinstance(v, MessageType))

    def message(kind: MessageType, value: Mapping[str, Any]) -> Any:
        built = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"pe.{kind.name}"))()
        for name, item in value.items():
            if kind.fields[name] == "dyn":
                json_format.ParseDict(item, getattr(built, name))
            elif isinstance(item, dict):
                getattr(built, name).update(item)
            elif isinstance(item, list):
                getattr(built, name).extend(item)
            else:
                setattr(built, name, item)
        return built

    messages = {
        name: message(kind, CONTEXT[name]) if isinstance(kind, MessageType) else CONTEXT[name]
        for name, kind in EVERYTHING.items()
    }
    disagreements = set()
    for source, _ in CORPUS:
        result = typed_env.compile(source).eval(data=messages)
        checked = RAISES if result.type().name() == "ERROR" else typed(result.plain_value())
        if checked != outcome(backend.compile(source, EVERYTHING, expect="dyn"), CONTEXT):
            disagreements.add(source)
    assert disagreements == {
        "event.payload.x + 1",
        "event.payload.items.map(i, i * 2)",
        "event.payload.items.filter(i, i % 2 == 0)",
    }


def test_condition_result_is_a_plain_bool(backend: cel.CelBackend) -> None:
    program = backend.compile('conn.ip.startsWith("10.")', CONNECT)
    assert program.evaluate(CONTEXT) is True


def test_key_result_is_a_plain_str(backend: cel.CelBackend) -> None:
    program = backend.compile('conn.user_id + ":" + conn.conversation_id', CONNECT, expect="string")
    assert type(program.evaluate(CONTEXT)) is str


def test_program_records_source_backend_and_expectation(backend: cel.CelBackend) -> None:
    program = backend.compile("load.loop_lag_ms", CONNECT, expect="int")
    assert (program.source, program.backend, program.expect) == (
        "load.loop_lag_ms",
        backend.name,
        "int",
    )


# --- what a program reads ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        ('conn.ip == "x" && load.loop_lag_ms > 1', {"conn", "load"}),
        ('"admin" in claims.roles', {"claims"}),
        ("[1, 2].exists(conn, conn > 1)", set()),
        ("[1, 2].exists(x, x > load.loop_lag_ms)", {"load"}),
        ("true", set()),
        ('event.name == "a" ? claims.tier == "pro" : false', {"event", "claims"}),
    ],
)
def test_variables_lists_only_referenced_top_level_names(
    backend: cel.CelBackend, source: str, variables: set[str]
) -> None:
    assert backend.compile(source, EVENT_HOOK).variables == frozenset(variables)


def test_unreferenced_contexts_need_not_be_built(backend: cel.CelBackend) -> None:
    program = backend.compile("load.loop_lag_ms > 10", EVENT_HOOK)
    assert program.evaluate({"load": CONTEXT["load"]}) is True


# --- compile errors ------------------------------------------------------------------------


def test_misspelt_field_points_at_it_and_suggests_the_field(backend: cel.CelBackend) -> None:
    error = compile_error(backend, 'conn.ipp == "x"')
    assert (error.code, error.offset) == ("cel-undefined-field", 4)
    assert "conn.ip`" in error.hint
    assert "ipp" in error.message


def test_misspelt_field_inside_has_is_reported(backend: cel.CelBackend) -> None:
    error = compile_error(backend, "has(conn.ipp)")
    assert (error.code, error.offset) == ("cel-undefined-field", 3)


def test_variable_the_hook_does_not_offer_is_undeclared(backend: cel.CelBackend) -> None:
    error = compile_error(backend, 'error.type == "TimeoutError"')
    assert (error.code, error.offset) == ("cel-undeclared", 5)
    assert "error.type" in error.message
    assert "conn" in error.hint


def test_misspelt_variable_suggests_the_declared_one(backend: cel.CelBackend) -> None:
    error = compile_error(backend, 'true && con.ip == "x"')
    assert (error.code, error.offset) == ("cel-undeclared", 11)
    assert error.hint == "did you mean `conn`?"


def test_unknown_function_is_undeclared(backend: cel.CelBackend) -> None:
    error = compile_error(backend, "[1].min() == 1")
    assert (error.code, error.offset) == ("cel-undeclared", 7)


@pytest.mark.parametrize(
    "name",
    [
        cel.CEL_EXPR_PYTHON,
        pytest.param(
            cel.CEL_PYTHON,
            marks=pytest.mark.skip(
                reason="cel-python has no type checker: operand types fail only at run time"
            ),
        ),
    ],
)
def test_operand_type_mismatch_is_a_type_error(name: str) -> None:
    if name not in BACKENDS:
        pytest.skip(f"{name} is not installed")
    error = compile_error(cel.get_backend(name), 'conn.auth_failures > "a"')
    assert (error.code, error.offset) == ("cel-type", 19)
    assert "'>'" in error.message


def test_fallback_reports_operand_type_mismatch_at_evaluation() -> None:
    if cel.CEL_PYTHON not in BACKENDS:
        pytest.skip("cel-python is not installed")
    program = cel.get_backend(cel.CEL_PYTHON).compile('conn.auth_failures > "a"', CONNECT)
    with pytest.raises(EvaluationError):
        program.evaluate(CONTEXT)


@pytest.mark.parametrize(
    ("source", "expect", "message"),
    [
        (
            "conn.auth_failures + 1",
            "bool",
            "this condition must be a bool, but the expression is an int",
        ),
        (
            "conn.priority > 1",
            "string",
            "this value must be a string, but the expression is a bool",
        ),
        ('conn.ip + "x"', "int", "this value must be an int, but the expression is a string"),
        ("conn.headers", "bool", "this condition must be a bool, but the expression is a map"),
    ],
)
def test_result_of_the_wrong_type_is_refused(
    backend: cel.CelBackend, source: str, expect: str, message: str
) -> None:
    error = compile_error(backend, source, expect=expect)
    assert (error.code, error.offset, error.message) == ("cel-return-type", 0, message)


@pytest.mark.parametrize(
    ("source", "offset"),
    [('conn.ip = "x"', 8), ("conn.ip ==", 10), ("has(conn)", 4), ("var + 1", 0)],
)
def test_syntax_error_points_at_the_problem(
    backend: cel.CelBackend, source: str, offset: int
) -> None:
    error = compile_error(backend, source)
    assert (error.code, error.offset) == ("cel-syntax", offset)
    assert not error.message.startswith("ERROR")
    assert "|" not in error.message


def test_multiline_expression_offsets_count_from_the_start(backend: cel.CelBackend) -> None:
    error = compile_error(backend, 'conn.ip == "x"\n  && conn.ipp == "y"')
    assert (error.code, error.offset) == ("cel-undefined-field", 24)


def test_source_over_the_length_limit_is_too_long(backend: cel.CelBackend) -> None:
    source = " || ".join(['conn.ip == "10.0.0.1"'] * 100)
    assert len(source) > cel.MAX_SOURCE_CHARS
    assert compile_error(backend, source).code == "cel-too-long"


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("(" * 40 + "true" + ")" * 40, id="nested-parentheses"),
        pytest.param(" + ".join(["1"] * 40) + " > 0", id="long-arithmetic-chain"),
        pytest.param("[" + ", ".join(["1"] * 600) + "].size() > 0", id="too-many-nodes"),
        pytest.param(
            "event.payload.items.exists(a, event.payload.items.exists(b, a == b))",
            id="comprehension-in-comprehension-over-runtime-list",
        ),
        pytest.param(
            "conn.headers.all(k, claims.roles.exists(r, r == k))",
            id="comprehension-in-comprehension-over-runtime-map",
        ),
        pytest.param(
            "[{0}].map(a, [{0}].map(b, [{0}].map(c, a + b + c))).size() > 0".format(
                ", ".join(["1"] * 50)
            ),
            id="literal-comprehensions-over-the-budget",
        ),
    ],
)
def test_expression_over_the_cost_bound_is_too_complex(
    backend: cel.CelBackend, source: str
) -> None:
    assert len(source) <= cel.MAX_SOURCE_CHARS
    assert compile_error(backend, source, EVENT_HOOK).code == "cel-too-complex"


@pytest.mark.parametrize(
    "source",
    [
        'conn.headers.exists(k, k.startsWith("x-"))',
        '[1, 2, 3].exists(i, claims.roles.exists(r, r == "admin"))',
        " || ".join([f'conn.ip == "10.0.0.{i}"' for i in range(60)]),
        " + ".join(["1"] * 30) + " > 0",
    ],
)
def test_bounded_expression_is_accepted(backend: cel.CelBackend, source: str) -> None:
    assert backend.compile(source, CONNECT).evaluate(CONTEXT) in (True, False)


@pytest.mark.parametrize(
    ("source", "offset"),
    [
        ('conn.ip.matches("[")', 16),
        ('matches(conn.ip, "(a")', 17),
        ('conn.ip.matches("a(?=b)")', 16),  # Python's re accepts lookahead; RE2 does not
        ("conn.ip.matches('''x{1001}''')", 16),
    ],
)
def test_invalid_regex_literal_is_refused_at_compile_time(
    backend: cel.CelBackend, source: str, offset: int
) -> None:
    error = compile_error(backend, source)
    assert (error.code, error.offset) == ("cel-bad-regex", offset)


def test_valid_re2_regex_literal_compiles(backend: cel.CelBackend) -> None:
    program = backend.compile(r'conn.user_agent.matches("\\p{Lu}[a-z]+/\\d")', CONNECT)
    assert program.evaluate(CONTEXT) is True


def test_unknown_expectation_is_a_programming_error(backend: cel.CelBackend) -> None:
    with pytest.raises(ValueError, match="expect"):
        backend.compile("true", CONNECT, expect="list")


# --- evaluation failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        'conn.headers["missing"] == "x"',
        "claims.admin",
        "conn.auth_failures / 0 > 1",
        "event.payload.flag",
    ],
)
def test_failed_condition_raises_instead_of_returning_false(
    backend: cel.CelBackend, source: str
) -> None:
    program = backend.compile(source, EVENT_HOOK)
    with pytest.raises(EvaluationError):
        program.evaluate(CONTEXT)


def test_dyn_result_of_the_wrong_type_raises(backend: cel.CelBackend) -> None:
    program = backend.compile("claims.role", CONNECT)
    with pytest.raises(EvaluationError, match="string, not a bool"):
        program.evaluate(CONTEXT)


def test_missing_context_raises(backend: cel.CelBackend) -> None:
    program = backend.compile('conn.ip == "x"', CONNECT)
    with pytest.raises(EvaluationError):
        program.evaluate({})


@pytest.mark.parametrize(
    ("source", "items"),
    [
        ("event.payload.items.exists(i, i < 0)", cel.ITERATION_BUDGET + 1),
        ("[1, 2, 3, 4, 5].exists(n, event.payload.items.exists(i, i < 0))", 2001),
    ],
    ids=["one-comprehension", "literal-times-runtime"],
)
def test_runtime_iteration_budget_raises(backend: cel.CelBackend, source: str, items: int) -> None:
    program = backend.compile(source, EVENT_HOOK)
    event = CONTEXT["event"] | {"payload": {"items": list(range(items))}}
    with pytest.raises(EvaluationError, match="budget"):
        program.evaluate(CONTEXT | {"event": event})


def test_iteration_budget_allows_a_list_within_it(backend: cel.CelBackend) -> None:
    program = backend.compile("event.payload.items.map(i, i + 1).size() > 0", EVENT_HOOK)
    event = CONTEXT["event"] | {"payload": {"items": list(range(500))}}
    assert program.evaluate(CONTEXT | {"event": event}) is True


def test_three_nested_maps_over_fifty_items_are_refused(backend: cel.CelBackend) -> None:
    source = "event.payload.items.map(a, event.payload.items.map(b, event.payload.items.map(c, 1)))"
    assert compile_error(backend, source, EVENT_HOOK, expect="dyn").code == "cel-too-complex"


# --- choosing an engine --------------------------------------------------------------------


def test_backends_are_shared_instances(backend: cel.CelBackend) -> None:
    fast_path = getattr(backend, "fast_path", True)
    assert cel.get_backend(backend.name, fast_path=fast_path) is backend


def test_environment_variable_chooses_the_engine(
    backend: cel.CelBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLICY_ENGINE_CEL", backend.name)
    assert cel.get_backend(fast_path=getattr(backend, "fast_path", True)) is backend


def test_default_engine_is_the_checked_one_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLICY_ENGINE_CEL", raising=False)
    assert cel.get_backend().name == BACKENDS[0]
    assert BACKENDS[-1] == cel.CEL_PYTHON


def test_unknown_engine_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICY_ENGINE_CEL", "cel-go")
    with pytest.raises(PolicyEngineError, match="cel-go"):
        cel.get_backend()


def test_compile_error_is_a_policy_engine_error() -> None:
    error = cel.CelCompileError("cel-syntax", "Syntax error", 3, "hint")
    assert isinstance(error, PolicyEngineError)
    assert (str(error), error.offset, error.hint) == ("Syntax error", 3, "hint")


def test_null_results_do_not_drain_references_to_none() -> None:
    """cel-expr-python 0.1.3 drops a reference to None per converted null: never convert one."""
    program = cel.get_backend(cel.CEL_EXPR_PYTHON, fast_path=False).compile(
        "claims.tier", {"claims": "map<string,dyn>"}, expect="dyn"
    )
    before = sys.getrefcount(None)
    for _ in range(5_000):
        assert program.evaluate({"claims": {"tier": None}}) is None
    assert sys.getrefcount(None) >= before - 100
