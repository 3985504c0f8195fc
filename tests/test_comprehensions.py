"""`validate` warns of comprehensions over client-sent lists that no schema bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policy_engine.compiler.pipeline import compile_text

RULE = """
authorization:
  rules:
    - name: no-admin-tag
      hook: event
      when: {when}
      effect: deny
"""


def warnings(tmp_path: Path, when: str, schema: dict[str, object] | None) -> list[str]:
    events = "events:\n  tag: {priority: normal}\n"
    if schema is not None:
        (tmp_path / "tag.json").write_text(json.dumps(schema))
        events = "events:\n  tag: {schema: tag.json}\n"
    text = "version: 1\n" + events + RULE.format(when=when)
    result = compile_text(text, base_dir=tmp_path)
    return [str(d) for d in result.warnings if d.code == "unbounded-comprehension"]


TAGS = '\'event.name == "tag" && event.payload.tags.exists(t, t == "admin")\''


@pytest.mark.parametrize(
    "schema",
    [None, {"type": "object"}, {"properties": {"tags": {"type": "array"}}}],
    ids=["no schema", "no property", "no maxItems"],
)
def test_a_comprehension_over_an_unbounded_list_is_reported(
    tmp_path: Path, schema: dict[str, object] | None
) -> None:
    (warning,) = warnings(tmp_path, TAGS, schema)
    assert "event.payload.tags" in warning
    assert "'tag'" in warning
    assert "authorization rule 'no-admin-tag'" in warning


def test_a_list_with_max_items_is_not_reported(tmp_path: Path) -> None:
    schema = {"properties": {"tags": {"type": "array", "maxItems": 20}}}
    assert warnings(tmp_path, TAGS, schema) == []


def test_a_condition_for_any_event_needs_every_event_bounded(tmp_path: Path) -> None:
    schema = {"properties": {"tags": {"type": "array", "maxItems": 20}}}
    (warning,) = warnings(tmp_path, "'event.payload.tags.filter(t, t == \"a\").size() > 0'", schema)
    assert "'*'" in warning
    assert "'tag'" not in warning


def test_comprehensions_over_lists_of_the_policy_itself_are_not_reported(tmp_path: Path) -> None:
    when = '\'["a", "b"].exists(t, t == event.payload.tag)\''
    assert warnings(tmp_path, when, None) == []
