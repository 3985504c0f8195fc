"""The ``authentication`` section at validate time: located errors for settings that cannot
work, and a warning for a policy that lets clients name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.compiler.pipeline import compile_text
from policy_engine.errors import PolicyError, Severity
from policy_engine.language.authentication import KeyKind, Requirement, TokenPlace


def compile_policy(text: str, tmp_path: Path):
    return compile_text(text, base_dir=tmp_path)


def codes(text: str, tmp_path: Path) -> list[tuple[str, int]]:
    with pytest.raises(PolicyError) as caught:
        compile_policy(text, tmp_path)
    return [(d.code, d.location.line) for d in caught.value.errors]


PROVIDER = """\
version: 1
authentication:
  providers:
    corp:
      issuer: https://login.example
      algorithms: [{algorithms}]
      keys: {keys}
  default: {{providers: [{listed}], require: {require}}}
"""


def test_a_provider_compiles_with_its_keys_resolved_against_the_policy_folder(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "corp.jwks").write_text('{"keys": []}', encoding="utf-8")
    text = PROVIDER.format(
        algorithms="RS256, ES256",
        keys="{jwks_file: keys/corp.jwks}",
        listed="corp, app",
        require="allow_missing",
    )
    spec = compile_policy(text, tmp_path).policy.authentication
    (corp,) = spec.providers
    assert corp.keys.kind is KeyKind.JWKS_FILE
    assert corp.keys.value == str(tmp_path / "keys" / "corp.jwks")
    assert corp.token_from[0].place is TokenPlace.HEADER
    assert corp.required_claims == ("exp",)
    assert spec.for_namespace("/chat").require is Requirement.ALLOW_MISSING


def test_hmac_mixed_with_public_key_algorithms_is_an_error_at_its_line(tmp_path):
    text = PROVIDER.format(
        algorithms="HS256, RS256", keys="{env: SECRET}", listed="corp", require="required"
    )
    assert codes(text, tmp_path) == [("mixed-key-families", 6)]


def test_a_missing_key_file_and_an_unknown_provider_are_both_reported(tmp_path):
    text = PROVIDER.format(
        algorithms="ES256", keys="{pem_file: nowhere.pem}", listed="crop", require="required"
    )
    assert sorted(codes(text, tmp_path)) == [("missing-key-file", 7), ("unknown-provider", 8)]


def test_algorithm_none_is_not_an_algorithm(tmp_path):
    text = PROVIDER.format(
        algorithms="none", keys="{env: SECRET}", listed="corp", require="required"
    )
    assert codes(text, tmp_path)[0][1] == 6


def test_trusting_client_chosen_user_ids_is_a_warning(tmp_path):
    text = "version: 1\nidentity:\n  trust_client_user_id: true\n"
    result = compile_policy(text, tmp_path)
    (warning,) = [d for d in result.warnings if d.code == "client-chosen-identity"]
    assert warning.severity is Severity.WARNING
    assert warning.location.line == 3
