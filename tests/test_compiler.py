from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_engine.compiler.pipeline import compile_file, compile_text
from policy_engine.errors import PolicyError, Severity
from policy_engine.language.contexts import Hook
from policy_engine.language.model import Mode, RateAlgorithm

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policies" / "policies.yaml"


def test_compiling_twice_gives_equal_policy_sets() -> None:
    first = compile_file(SHIPPED).policy
    second = compile_file(SHIPPED).policy
    assert first == second
    assert first.version == second.version
    assert len(first.version) == 64


def test_the_version_changes_with_the_content_but_not_with_comments() -> None:
    base = "version: 1\nrate_limits:\n  - {name: a, hook: connect, key: conn.ip, limit: 5/s}\n"
    version = compile_text(base).policy.version
    assert compile_text("# a comment\n" + base).policy.version == version
    assert compile_text(base.replace("5/s", "6/s")).policy.version != version


def test_the_version_covers_event_schemas(tmp_path: Path) -> None:
    schema = tmp_path / "e.json"
    schema.write_text('{"type": "object"}')
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nevents:\n  e: {schema: e.json}\n")
    before = compile_file(policy).policy.version
    schema.write_text('{"type": "array"}')
    assert compile_file(policy).policy.version != before


def test_units_and_defaults_are_resolved_at_compile_time() -> None:
    policy = compile_file(SHIPPED).policy
    per_ip = policy.rate_limits[0]
    assert (per_ip.rate.limit, per_ip.rate.period, per_ip.burst) == (20, 60.0, 5)
    assert per_ip.algorithm is RateAlgorithm.GCRA
    assert policy.rate_limits[3].mode is Mode.SHADOW
    assert policy.connections.idle_timeout == 300.0
    assert policy.events["oh_user_action"].max_bytes == 1_000_000
    assert policy.default_event.max_bytes == 64_000
    breaker = policy.circuit_breakers[0]
    assert breaker.failure_rate == 0.5
    assert breaker.slow_call is not None
    assert (breaker.slow_call.over, breaker.slow_call.rate) == (2.0, 0.8)
    assert policy.backoff["default"].base == 0.5


def test_rules_after_a_catch_all_are_reported_as_unreachable() -> None:
    result = compile_text(
        "version: 1\nerrors:\n"
        "  - {name: everything, when: 'true', category: system, code: INTERNAL}\n"
        "  - {name: late, when: 'error.type == \"X\"', category: client, code: X}\n"
    )
    (warning,) = result.warnings
    assert warning.severity is Severity.WARNING
    assert warning.code == "unreachable-rule"
    assert warning.location.line == 4
    assert "'late' is never reached" in warning.message


def test_a_warning_alone_does_not_reject_the_policy() -> None:
    result = compile_text(
        "version: 1\nrate_limits:\n"
        "  - {name: a, hook: event, key: conn.sid, limit: 5/s, algorithm: fixed_window, burst: 3}\n"
    )
    assert [w.code for w in result.warnings] == ["ignored-burst"]


def test_both_cel_engines_compile_the_shipped_policy_to_equal_sets() -> None:
    native = compile_file(SHIPPED, backend="cel-expr-python").policy
    fallback = compile_file(SHIPPED, backend="cel-python").policy
    assert native == fallback


def test_a_missing_file_is_a_policy_error_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        compile_file(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(caught.value)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from(
        [
            "conn.ip",
            "true",
            "5/s",
            "30s",
            "50%",
            "1MB",
            "connect",
            "event",
            "reject",
            "gcra",
            "x",
            "",
            'event.name == "a"',
            "conn.ipp",
            "{",
        ]
    ),
)
_KEYS = st.sampled_from(
    [
        "version",
        "name",
        "hook",
        "key",
        "limit",
        "when",
        "action",
        "rate_limits",
        "errors",
        "shedding",
        "connections",
        "events",
        "backoff",
        "category",
        "code",
        "max_total",
        "window",
        "calls",
        "match",
        "circuit_breakers",
        "authorization",
        "rules",
        "effect",
        "schema",
    ]
)
_TREES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _TREES, max_size=6), st.booleans())
def test_compile_never_raises_anything_but_a_policy_error(
    document: dict[str, object], with_version: bool
) -> None:
    if with_version:
        document = {"version": 1, **document}
    text = yaml.safe_dump(document)
    try:
        result = compile_text(text)
    except PolicyError as exc:
        assert exc.diagnostics
        assert all(d.location.file == "<string>" for d in exc.diagnostics)
    else:
        assert result.policy.version


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_escapes_as_another_exception(text: str) -> None:
    try:
        compile_text(text)
    except PolicyError as exc:
        assert exc.diagnostics


def test_rate_limits_are_indexed_by_the_event_names_their_conditions_require() -> None:
    policy = compile_text(
        "version: 1\nrate_limits:\n"
        "  - {name: all, hook: event, key: conn.sid, limit: 5/s}\n"
        "  - {name: a-only, hook: event, when: 'event.name == \"a\"', key: conn.sid, limit: 5/s}\n"
        '  - {name: a-or-b, hook: event, when: \'event.name in ["a", "b"] && conn.ip != ""\','
        " key: conn.sid, limit: 5/s}\n"
        "  - {name: by-ip, hook: event, when: 'conn.ip != \"\"', key: conn.ip, limit: 5/s}\n"
    ).policy

    def names(event: str) -> list[str]:
        return [r.name for r in policy.by_hook.rate_limits_for(Hook.EVENT, event)]

    assert names("a") == ["all", "a-only", "a-or-b", "by-ip"]
    assert names("b") == ["all", "a-or-b", "by-ip"]
    assert names("other") == ["all", "by-ip"]


def refused(text: str) -> list[tuple[int, str]]:
    with pytest.raises(PolicyError) as caught:
        compile_text(text)
    return [(d.location.line, d.code) for d in caught.value.diagnostics]


def test_a_rule_the_schema_refuses_does_not_hide_its_siblings_expression_errors() -> None:
    assert refused(
        "version: 1\nrate_limits:\n"
        "  - {name: a, hook: connect, key: conn.ip, limit: 5/s, burts: 2}\n"
        "  - {name: b, hook: connect, key: conn.ipp, limit: 5/s}\n"
    ) == [(3, "schema-unknown-key"), (4, "cel-undefined-field")]


def test_the_parts_a_schema_error_makes_unreadable_are_not_checked_twice() -> None:
    # The broken rule's own expression is not compiled: its problem is the schema's.
    assert refused(
        "version: 1\nrate_limits:\n  - {name: a, hook: conect, key: conn.ipp, limit: 5/s}\n"
    ) == [(3, "schema-enum")]


def test_references_into_a_broken_section_are_not_reported_as_missing() -> None:
    # `slow` is defined, only wrongly: the error rule naming it is not told it is undefined.
    assert refused(
        "version: 1\nbackoff:\n  slow: {base: 1 second}\n"
        "errors: [{name: e, when: 'true', category: system, code: E, backoff: slow}]\n"
    ) == [(3, "schema-pattern")]


def test_warnings_of_valid_sections_come_with_the_schema_errors_in_file_order() -> None:
    assert refused(
        "version: 1\nerrors:\n"
        "  - {name: everything, when: 'true', category: system, code: INTERNAL}\n"
        "  - {name: late, when: 'true', category: client, code: X}\n"
        "shedding: 5\n"
    ) == [(4, "unreachable-rule"), (5, "schema-type")]
