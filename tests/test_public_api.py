"""The public API: what ``import policy_engine`` offers, and that it stays cheap to import."""

import subprocess
import sys
from pathlib import Path

import policy_engine

POLICY = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"


def test_every_public_name_resolves_to_the_object_its_module_defines() -> None:
    import importlib

    names = [n for n in policy_engine.__all__ if n != "__version__"]
    assert sorted(names) == sorted(policy_engine._EXPORTS)
    for name in names:
        module = importlib.import_module(policy_engine._EXPORTS[name])
        assert getattr(policy_engine, name) is getattr(module, name)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        _ = policy_engine.no_such_thing  # type: ignore[attr-defined]
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("an unknown name resolved")


def test_compiling_a_policy_does_not_import_the_server_stack() -> None:
    code = (
        "import sys, policy_engine\n"
        f"policy_engine.compile_file({str(POLICY)!r})\n"
        "print(sorted(m for m in ('socketio', 'engineio', 'uvicorn', 'prometheus_client')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented_names() -> set[str]:
    """The names docs/api.md gives a heading of their own: ``### `name` `` (several names
    share a heading as ``### `a`, `b` ``)."""
    names: set[str] = set()
    for line in API_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("### `"):
            names.update(part.strip(" `") for part in line[4:].split(","))
    return names


def test_every_public_name_is_documented_and_every_documented_name_is_public() -> None:
    assert documented_names() == set(policy_engine.__all__)


def test_the_package_says_it_is_typed() -> None:
    assert (Path(policy_engine.__file__).parent / "py.typed").is_file()


def test_every_python_example_in_the_api_doc_compiles() -> None:
    import ast
    import re

    text = API_DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)

    assert len(blocks) >= 10
    for block in blocks:  # top-level ``await`` as in an asyncio REPL or a notebook
        compile(block, "docs/api.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
