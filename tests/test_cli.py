from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from policy_engine.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policies" / "policies.yaml"
INVALID = Path(__file__).parent / "policies" / "invalid"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_validate_accepts_the_shipped_policies() -> None:
    files = [str(SHIPPED), *map(str, sorted((ROOT / "policies" / "examples").glob("*.yaml")))]
    code, output = run("validate", *files)
    assert code == 0, output
    assert output.count(": ok (version ") == len(files)


def test_validate_reports_every_problem_with_file_line_column_and_exits_1() -> None:
    path = INVALID / "multiple-problems.yaml"
    code, output = run("validate", str(path))
    assert code == 1
    lines = [line for line in output.splitlines() if ": error: " in line]
    assert [line.split(": error: ")[0] for line in lines] == [
        f"{path}:5:14",
        f"{path}:7:11",
        f"{path}:9:15",
        f"{path}:12:29",
    ]
    assert "hint: did you mean `conn.ip`?" in output
    assert output.rstrip().endswith("4 error(s) in 1 file(s)")


def test_validate_checks_every_file_even_after_a_broken_one() -> None:
    code, output = run("validate", str(INVALID / "yaml-empty.yaml"), str(SHIPPED))
    assert code == 1
    assert "empty-file" in output
    assert f"{SHIPPED}: ok" in output


def test_validate_json_format_is_machine_readable() -> None:
    code, output = run("validate", "--format", "json", str(INVALID / "cel-misspelt-field.yaml"))
    assert code == 1
    report = json.loads(output)
    assert report["valid"] is False
    (diagnostic,) = report["files"][0]["diagnostics"]
    assert diagnostic["line"] == 5
    assert diagnostic["column"] == 14
    assert diagnostic["code"] == "cel-undefined-field"
    assert diagnostic["pointer"] == "/rate_limits/0/key"
    assert "conn.ip" in diagnostic["hint"]


def test_validate_github_format_annotates_the_line() -> None:
    code, output = run("validate", "--format", "github", str(INVALID / "schema-bad-hook.yaml"))
    assert code == 1
    assert output.startswith(f"::error file={INVALID / 'schema-bad-hook.yaml'},line=4,col=11,")
    assert "title=schema-enum::" in output
    assert "did you mean 'connect'?" in output


def test_strict_turns_warnings_into_failures(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nerrors:\n"
        "  - {name: all, when: 'true', category: system, code: INTERNAL}\n"
        "  - {name: never, when: 'error.type == \"X\"', category: client, code: X}\n"
    )
    code, output = run("validate", str(policy))
    assert code == 0
    assert f"{policy}:4:" in output
    assert "never reached" in output
    code, _ = run("validate", "--strict", str(policy))
    assert code == 1


@pytest.mark.parametrize(
    "argv", [[], ["validate"], ["frobnicate"], ["validate", "--format", "xml", "x.yaml"]]
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert run(*argv)[0] == 2


def test_schema_prints_the_json_schema() -> None:
    code, output = run("schema")
    assert code == 0
    assert json.loads(output)["$schema"].endswith("2020-12/schema")


def test_explain_prints_the_deciding_rule_and_trace() -> None:
    context = {
        "conn": {"ip": "203.0.113.1", "conversation_id": "c1"},
        "claims": {"role": "viewer"},
        "event": {"name": "oh_user_action", "payload": {"action": "run"}},
    }
    code, output = run(
        "explain", "--policies", str(SHIPPED), "--hook", "event",
        "--context", json.dumps(context), "--format", "json",
    )  # fmt: skip
    assert code == 0
    report = json.loads(output)
    assert report["outcome"] == "reject"
    assert report["rule"] == "authorization/read-only-viewers"
    assert report["payload"]["code"] == "READ_ONLY"
    matched = [(t["section"], t["rule"]) for t in report["trace"] if t["matched"]]
    # Rate limits are judged before authorization: an over-limit client costs no more.
    assert matched[-1] == ("authorization", "read-only-viewers")
    assert {section for section, _ in matched[:-1]} == {"rate_limits"}


def test_explain_refuses_an_unknown_context_field() -> None:
    code, _ = run(
        "explain", "--policies", str(SHIPPED), "--hook", "connect",
        "--context", '{"conn": {"ipp": "1.2.3.4"}}',
    )  # fmt: skip
    assert code == 2


def test_policy_tests_pass_for_the_shipped_policy() -> None:
    code, output = run("test", str(ROOT / "policies" / "tests"))
    assert code == 0, output
    assert output.rstrip().endswith(" passed, 0 failed")


def test_a_failing_policy_test_exits_1_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "wrong_test.yaml").write_text(
        f"policy: {SHIPPED}\n"
        "tests:\n"
        "  - name: wrong expectation\n"
        "    hook: connect\n"
        "    context: {conn: {ip: 1.2.3.4}}\n"
        "    expect: {outcome: allow}\n"
    )
    code, output = run("test", str(tmp_path))
    assert code == 1
    assert "FAIL" in output
    assert "outcome: expected 'allow', got 'reject'" in output


def test_validate_imports_nothing_of_the_server_stack() -> None:
    script = (
        "import sys; from policy_engine.cli.main import main; "
        f"code = main(['validate', {str(SHIPPED)!r}]); "
        "heavy = [m for m in ('socketio', 'engineio', 'uvicorn', 'redis', 'prometheus_client') "
        "if m in sys.modules]; print(heavy); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_token_signs_with_the_development_key_the_shipped_policy_trusts() -> None:
    import jwt

    from policy_engine.cli.token import DEV_AUDIENCE

    out = io.StringIO()
    assert main(["token", "alice", "--claim", "role=admin"], out=out) == 0
    jwks = json.loads((ROOT / "policies" / "keys" / "dev-jwks.json").read_text())
    key = jwt.PyJWK(jwks["keys"][0]).key
    claims = jwt.decode(out.getvalue().strip(), key, algorithms=["ES256"], audience=DEV_AUDIENCE)
    assert (claims["sub"], claims["role"]) == ("alice", "admin")


def test_token_outside_a_checkout_takes_the_key_of_the_policies_folder_here_or_asks_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed from a wheel there is no checkout's key: ``policies/keys/`` of the current
    folder (a copy of the shipped policies) is used, else ``--key`` is asked for."""
    from policy_engine.cli import token

    monkeypatch.setattr(token, "DEV_KEY", tmp_path / "absent" / "dev-signing-key.pem")
    monkeypatch.chdir(tmp_path)
    assert main(["token", "alice"], out=io.StringIO()) == 2
    assert "--key" in capsys.readouterr().err

    (tmp_path / "policies" / "keys").mkdir(parents=True)
    copy = tmp_path / "policies" / "keys" / "dev-signing-key.pem"
    copy.write_bytes((ROOT / "policies" / "keys" / "dev-signing-key.pem").read_bytes())
    out = io.StringIO()
    assert main(["token", "alice"], out=out) == 0
    assert out.getvalue().count(".") == 2  # header.payload.signature
