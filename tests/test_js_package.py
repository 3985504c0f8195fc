"""clients/js as the ``@policy-engine/client`` package: its exports and its type declarations.

tests/js depends on the package as an application would (``file:../../clients/js``), so
the contract tests (tests/test_js_contract.py) import it by name through its ``exports``;
here the declarations are checked against the module and against a typed usage, with the
TypeScript compiler that ``npm ci --prefix tests/js`` installs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from test_js_contract import JS_DIR, NODE, pytestmark  # noqa: F401 (the same skip or failure)

PACKAGE = JS_DIR.parent.parent / "clients" / "js"


def node(code: str) -> str:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", code],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_package_name_resolves_to_the_module_through_its_exports() -> None:
    resolved = node('process.stdout.write(import.meta.resolve("@policy-engine/client"))')

    assert Path(resolved.removeprefix("file://")).resolve() == PACKAGE / "policy-client.mjs"


def test_the_declarations_name_every_export_of_the_module_and_nothing_else() -> None:
    exported = json.loads(
        node(
            'const m = await import("@policy-engine/client");'
            "process.stdout.write(JSON.stringify(Object.keys(m)))"
        )
    )
    declarations = (PACKAGE / "policy-client.d.ts").read_text(encoding="utf-8")

    declared = re.findall(r"^export declare (?:const|function|class) (\w+)", declarations, re.M)

    assert sorted(declared) == sorted(exported)


def test_a_typed_usage_type_checks_against_the_declarations() -> None:
    tsc = JS_DIR / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "typescript is not installed: run `npm ci --prefix tests/js`"

    done = subprocess.run(
        [str(tsc), "--noEmit", "-p", str(JS_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # typed-usage.ts also holds `@ts-expect-error` lines: declarations that degrade to
    # `any` turn them into errors of their own.
    assert done.returncode == 0, done.stdout + done.stderr
