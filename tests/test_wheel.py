"""The wheel installs and works: built from the sdist, into a clean virtual environment.

Every other test imports the package from the source tree, where a file the wheel forgot
(the policy JSON Schema, the status page, ``py.typed``, a module outside the package) is
still found beside the code. Here ``python -m build`` makes the sdist and, from it, the
wheel; the wheel goes into a fresh venv with only its declared dependencies; and the
installed ``policy-engine`` validates the shipped policies and serves one, from a copy of
``policies/`` outside the repository, so nothing can be read from the source tree.

The build and the install fetch packages (hatchling, the dependencies) from the package
index; CI sets ``POLICY_ENGINE_REQUIRE_WHEEL=1`` so that a missing ``build`` fails here
instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Process, answers
from redis_server import free_port

import policy_engine

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding the sdist and the wheel ``python -m build`` made from it."""
    if importlib.util.find_spec("build") is None:
        if os.environ.get("POLICY_ENGINE_REQUIRE_WHEEL") == "1":
            pytest.fail("the `build` package is missing (it is in the dev extra)")
        pytest.skip("the `build` package is not installed: pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh venv where only the wheel (with ``[server]``) is."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", str(venv)])
    [wheel] = dist.glob("*.whl")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[server]"])
    return venv / "bin"


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """A copy of the shipped ``policies/`` folder, away from the source tree."""
    copy = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", copy)
    return copy


def run(argv: list[str], cwd: Path | None = None) -> str:
    """Run ``argv`` without the test run's ``PYTHONPATH`` (it points at the source tree)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def test_the_wheel_carries_the_data_files_and_the_type_marker(dist: Path) -> None:
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")

    names = set(zipfile.ZipFile(wheel).namelist())

    assert sdist.name == f"policy_engine-{policy_engine.__version__}.tar.gz"
    for data in (
        "policy_engine/py.typed",
        "policy_engine/_schemas/policy.schema.json",
        "policy_engine/server/dashboard.html",
    ):
        assert data in names
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "policy_engine").rglob("*.py")}
    assert modules <= names  # every module, the ones beside __init__.py included


def test_the_installed_package_imports_its_public_api_from_the_venv(
    installed: Path, tmp_path: Path
) -> None:
    code = (
        "import json, policy_engine\n"
        "names = [n for n in policy_engine.__all__ if n != '__version__']\n"
        "print(json.dumps({'file': policy_engine.__file__,"
        " 'resolved': [n for n in names if getattr(policy_engine, n, None) is not None]}))\n"
    )

    found = json.loads(run([str(installed / "python"), "-c", code], cwd=tmp_path))

    assert Path(found["file"]).is_relative_to(installed.parent)
    assert sorted(found["resolved"]) == sorted(set(policy_engine.__all__) - {"__version__"})


def test_the_installed_command_validates_the_shipped_policies(
    installed: Path, policies: Path
) -> None:
    files = [
        "policies.yaml",
        *sorted(str(p.relative_to(policies)) for p in policies.glob("examples/*.yaml")),
    ]

    out = run([str(installed / "policy-engine"), "validate", *files], cwd=policies)
    tests = run([str(installed / "policy-engine"), "test", "tests"], cwd=policies)

    assert out.count(": ok (version ") == len(files), out
    assert " 0 failed" in tests, tests


@pytest.fixture
def served(installed: Path, policies: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The installed ``policy-engine serve`` on the shipped policy: (public URL, ops URL)."""
    port, ops_port = free_port(), free_port()
    process = Process("serve", tmp_path / "serve.log")
    process.spawn(
        [
            str(installed / "policy-engine"),
            "serve",
            "--policies",
            str(policies / "policies.yaml"),
            "--port",
            str(port),
            "--ops-port",
            str(ops_port),
            "--log-format",
            "json",
            "--graceful-timeout",
            "1",
        ],
        env={"PYTHONPATH": ""},
    )
    try:
        process.wait_until_answering(f"http://127.0.0.1:{ops_port}/readyz")
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ops_port}"
    finally:
        process.stop()


def test_the_installed_command_serves_the_shipped_policy(
    installed: Path, policies: Path, served: tuple[str, str]
) -> None:
    public, ops = served
    validated = run([str(installed / "policy-engine"), "validate", "policies.yaml"], cwd=policies)
    version = validated.split("(version ")[1].split(")")[0]

    with urllib.request.urlopen(f"{public}/socket.io/?EIO=4&transport=polling", timeout=5) as r:
        handshake = r.read().decode()
    with urllib.request.urlopen(f"{ops}/dashboard", timeout=5) as page:
        dashboard = page.read().decode()
    with urllib.request.urlopen(f"{ops}/status", timeout=5) as status:
        state = status.read().decode()

    assert answers(f"{public}/healthz") == 200
    assert handshake.startswith('0{"sid":')  # Engine.IO's open packet
    assert "<title>policy-engine status</title>" in dashboard
    assert f'"version": "{version}' in state  # the policy it loaded is the one validated
