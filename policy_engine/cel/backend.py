"""Which CEL engine runs: an explicit name, else ``$POLICY_ENGINE_CEL``, else the best one.

``cel-expr-python`` (Google's C++ CEL, with a type checker) is preferred; ``cel-python``
(pure Python, no checker, much slower) is the fallback where no wheel exists. Both read
expressions through the same grammar for their shared checks, so an expression the C++
parser accepts but that grammar does not is ``cel-syntax`` on both: a policy that
validates with one engine runs with the other.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping
from functools import cache
from typing import Final

from policy_engine.cel.cpp import CelExprBackend
from policy_engine.cel.program import CEL_EXPR_PYTHON, CEL_PYTHON, CelBackend
from policy_engine.cel.python import CelpyBackend
from policy_engine.errors import PolicyEngineError

BACKEND_ENV_VAR: Final = "POLICY_ENGINE_CEL"

_MODULES: Final[Mapping[str, str]] = {
    CEL_EXPR_PYTHON: "cel_expr_python.cel",
    CEL_PYTHON: "celpy",
}
_BACKENDS: dict[tuple[str, bool], CelBackend] = {}
_BACKENDS_LOCK: Final = threading.Lock()


def available_backends() -> tuple[str, ...]:
    """The engines importable here, preferred first."""
    return tuple(name for name in _MODULES if _importable(name))


def get_backend(name: str | None = None, *, fast_path: bool = True) -> CelBackend:
    """The named engine, else ``$POLICY_ENGINE_CEL``, else the best one installed.

    With ``fast_path`` (the default), cel-expr-python programs inside the fast path's
    subset run as Python closures with the same results; ``fast_path=False`` gives the
    engine alone, the reference those closures are tested against.
    """
    chosen = name or os.environ.get(BACKEND_ENV_VAR) or None
    if chosen is None:
        chosen = CEL_EXPR_PYTHON if _importable(CEL_EXPR_PYTHON) else CEL_PYTHON
    if chosen not in _MODULES:
        known = ", ".join(_MODULES)
        raise PolicyEngineError(f"unknown CEL engine {chosen!r}; expected one of: {known}")
    key = (chosen, fast_path and chosen == CEL_EXPR_PYTHON)
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(key)
        if backend is None:
            if not _importable(chosen):
                raise PolicyEngineError(f"the CEL engine {chosen!r} is not installed here")
            backend = _BACKENDS[key] = _build(chosen, fast_path=key[1])
    return backend


def _build(name: str, *, fast_path: bool) -> CelBackend:
    if name == CEL_EXPR_PYTHON:
        return CelExprBackend(fast_path=fast_path)
    return CelpyBackend()


@cache
def _importable(name: str) -> bool:
    try:
        importlib.import_module(_MODULES[name])
    except (ImportError, OSError):
        return False
    return True
