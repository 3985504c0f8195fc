"""Every broken policy in tests/policies/invalid is refused with the exact place and message."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.compiler.pipeline import compile_file
from policy_engine.errors import PolicyError

INVALID = Path(__file__).parent / "policies" / "invalid"

# file -> every expected error: (line, column or None, code, message fragment)
EXPECTED: dict[str, list[tuple[int, int | None, str, str]]] = {
    # YAML syntax and hostile input
    "yaml-unclosed-flow": [(4, 1, "yaml-syntax", "did not find expected ',' or '}'")],
    "yaml-tab-indent": [(3, 1, "yaml-syntax", "cannot start any token")],
    "yaml-duplicate-key": [
        (4, 3, "duplicate-key", "duplicate key 'mode' (first defined at line 3)")
    ],
    "yaml-duplicate-nested-key": [(7, 5, "duplicate-key", "duplicate key 'limit'")],
    "yaml-bad-indentation": [(4, 18, "yaml-syntax", "mapping values are not allowed")],
    "yaml-empty": [(0, None, "empty-file", "the policy file is empty")],
    "yaml-only-comments": [(0, None, "empty-file", "the policy file is empty")],
    "yaml-root-is-list": [(1, 1, "not-a-mapping", "must be a mapping, found a list")],
    "yaml-python-tag": [(2, 11, "unsupported-tag", "'!!python/object:os.system'")],
    "yaml-billion-laughs": [(4, 8, "too-many-aliases", "over 100 alias expansions")],
    "yaml-deep-nesting": [(2, None, "too-deep", "nests deeper than 64 levels")],
    "yaml-not-utf8": [(3, 9, "not-utf8", "invalid byte 0xff")],
    # structure (JSON Schema)
    "schema-missing-version": [(1, 1, "schema-missing-key", "missing required key 'version'")],
    "schema-wrong-version": [(1, 10, "schema-const", "must be 1, got 2")],
    "schema-unknown-top-key": [(2, 1, "schema-unknown-key", "unknown key 'rate_limit'")],
    "schema-unknown-rule-key": [
        (3, 5, "schema-missing-key", "missing required key 'limit'"),
        (6, 5, "schema-unknown-key", "unknown key 'limt'"),
    ],
    "schema-bad-duration": [(3, 17, "schema-pattern", "'5 minutes' is not valid")],
    "schema-bad-rate": [(6, 12, "schema-pattern", "'20 per minute' is not valid")],
    "schema-bad-percent": [(5, 19, "schema-type", "expected string, got the number 50")],
    "schema-bad-category": [(5, 15, "schema-enum", "'sytem' is not one of")],
    "schema-bad-hook": [(4, 11, "schema-enum", "'conect' is not one of")],
    "schema-missing-key": [(3, 5, "schema-missing-key", "missing required key 'key'")],
    "schema-bad-rule-name": [(3, 11, "schema-pattern", "'Per IP' is not valid")],
    "schema-bad-code": [(6, 11, "schema-pattern", "'internal_error' is not valid")],
    "schema-wrong-type": [(3, 14, "schema-type", "expected integer, got a string")],
    "schema-window-both": [(5, 13, "schema-max-properties", "set only one of calls, time")],
    "schema-negative-size": [(4, 16, "schema-minimum", "-1 is less than the minimum of 0")],
    "schema-bad-mode": [(3, 9, "schema-enum", "'enforcing' is not one of")],
    "schema-rules-not-a-list": [(3, 3, "schema-type", "expected array, got a mapping")],
    # semantics
    "semantic-duplicate-name": [(8, 11, "duplicate-name", "'a' is already used by rate_limits")],
    "semantic-unknown-backoff": [(9, 14, "unknown-backoff", "'slwo' is not defined")],
    "semantic-backoff-max-below-base": [(3, 29, "out-of-range", "max (1s) is below its base")],
    "semantic-missing-event-schema": [(4, 13, "missing-file", "'events/nope.json' cannot be read")],
    "semantic-event-schema-not-json": [(4, 13, "bad-event-schema", "is not JSON")],
    "semantic-event-schema-invalid": [(4, 13, "bad-event-schema", "is not a valid JSON Schema")],
    "semantic-load-exit-above-enter": [(4, 41, "bad-hysteresis", "exit (800) is above enter")],
    "semantic-load-no-signal": [(4, 3, "no-signal", "`overloaded` names no signal")],
    "semantic-load-zero-window": [(3, 11, "bad-window", "window must be longer than 0")],
    "schema-load-unknown-signal": [(4, 5, "schema-unknown-key", "unknown key 'loop_lag_ms'")],
    "semantic-minimum-calls-exceed-window": [
        (6, 20, "out-of-range", "minimum_calls (20) exceeds the window of 10 calls")
    ],
    "semantic-sliding-window-too-large": [(6, 12, "out-of-range", "at most 10000 per window")],
    "semantic-bad-trusted-proxy": [(3, 33, "bad-network", "'not-a-network' is not an IP network")],
    "semantic-reject-at-event-hook": [
        (4, 11, "bad-hook", "action reject cannot act at hook event")
    ],
    "semantic-delay-without-delay": [(3, 5, "missing-key", "action delay needs `delay:`")],
    "semantic-auth-failures-unknown-backoff": [(4, 14, "unknown-backoff", "'progresive'")],
    "semantic-zero-rate": [(6, 12, "unit", "count and period must be greater than zero")],
    "semantic-zero-failure-rate": [(5, 19, "out-of-range", "failure_rate of 0%")],
    "semantic-unknown-default-backoff": [(3, 12, "unknown-backoff", "'gentle' is not defined")],
    "semantic-shed-without-hook": [(3, 5, "missing-key", "action drop needs `hook:`")],
    # CEL
    "cel-misspelt-field": [(5, 14, "cel-undefined-field", "`conn` has no field 'ipp'")],
    "cel-variable-not-at-hook": [(5, 16, "cel-undeclared", "'error.type'")],
    "cel-event-at-connect": [(6, 18, "cel-undeclared", "'event.name'")],
    "cel-type-mismatch": [(5, 28, "cel-type", "no matching overload for '>'")],
    "cel-non-boolean-condition": [(4, 11, "cel-return-type", "must be a bool")],
    "cel-key-not-string": [(5, 10, "cel-return-type", "must be a string")],
    "cel-syntax-error": [(4, 24, "cel-syntax", "Syntax error")],
    "cel-too-long": [(4, 11, "schema-max-length", "longer than 2048 characters")],
    "cel-bad-regex": [(4, 33, "cel-bad-regex", "invalid regular expression '([a-z'")],
    "cel-priority-not-int": [(3, 13, "cel-return-type", "must be an int")],
    "cel-record-when-raw-error-only": [(4, 16, "cel-undefined-field", "no field 'category'")],
    "cel-block-scalar": [(6, 11, "cel-undefined-field", "no field 'ipp'")],
    "cel-disconnect-shed-sees-load-only": [(4, 15, "cel-undeclared", "'conn.ip'")],
    # several problems are all reported in one run
    "multiple-problems": [
        (5, 14, "cel-undefined-field", "no field 'ipp'"),
        (7, 11, "duplicate-name", "'a' is already used"),
        (9, 15, "cel-undefined-field", "no field 'nme'"),
        (12, 29, "out-of-range", "backoff max (1s) is below its base (10s)"),
    ],
    # a schema error does not hide the expression errors of the parts the schema passed
    "mixed-unknown-top-key-and-cel": [
        (2, 1, "schema-unknown-key", "unknown key 'rate_limit'"),
        (7, 14, "cel-undefined-field", "`conn` has no field 'ipp'"),
    ],
    "mixed-two-schema-two-cel": [
        (2, 18, "schema-enum", "'enforcing' is not one of"),
        (5, 16, "cel-undefined-field", "`error` has no field 'typ'"),
        (12, 12, "schema-pattern", "'20 per minute' is not valid"),
        (14, 50, "cel-undefined-field", "`load` has no field 'loop_lag'"),
    ],
}


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.stem for p in INVALID.glob("*.yaml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_policy_is_refused_at_the_right_place(name: str) -> None:
    path = INVALID / f"{name}.yaml"
    with pytest.raises(PolicyError) as caught:
        compile_file(path)
    found = [(d.location.line, d.location.column, d.code, d.message) for d in caught.value.errors]
    assert len(found) == len(EXPECTED[name]), found
    for (line, column, code, fragment), (got_line, got_column, got_code, message) in zip(
        EXPECTED[name], found, strict=True
    ):
        assert (got_line, got_code) == (line, code), found
        if column is not None:
            assert got_column == column, found
        assert fragment in message, found
        assert caught.value.errors[0].location.file == str(path)
