"""External programs the tests run (redis-server, HAProxy, promtool, Chromium): found on the
PATH, or the test is skipped; CI sets ``POLICY_ENGINE_REQUIRE_<WHAT>=1``, which makes a
missing one fail the test instead of hiding behind a skip."""

from __future__ import annotations

import os
import shutil

import pytest


def required_tool(name: str, requirement: str, missing: str, *, path: str | None = None) -> str:
    """The path of ``name`` (looked up on ``path`` too, when given); without it, skips the
    test with ``missing``, or fails it when ``POLICY_ENGINE_REQUIRE_<requirement>=1``."""
    binary = shutil.which(name) or (shutil.which(name, path=path) if path else None)
    if binary is None:
        variable = f"POLICY_ENGINE_REQUIRE_{requirement}"
        if os.environ.get(variable) == "1":
            pytest.fail(f"{missing}, and {variable}=1")
        pytest.skip(missing)
    return binary
