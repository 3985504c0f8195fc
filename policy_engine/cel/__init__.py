"""CEL behind one interface: parsing, checking, analysis of the tree and evaluation.

The compiler asks this package for programs (:func:`get_backend`, then ``compile``) and for
facts about an expression (:mod:`policy_engine.cel.analysis`); nothing above it knows
which CEL engine runs.
"""

from policy_engine.cel.backend import BACKEND_ENV_VAR, available_backends, get_backend
from policy_engine.cel.checks import (
    ITERATION_BUDGET,
    MAX_DEPTH,
    MAX_NODES,
    MAX_SOURCE_CHARS,
    CelCompileError,
)
from policy_engine.cel.cpp import checked_fast_program, evaluator_of
from policy_engine.cel.program import (
    CEL_EXPR_PYTHON,
    CEL_PYTHON,
    CelBackend,
    CompiledProgram,
    SharedContext,
)

__all__ = [
    "BACKEND_ENV_VAR",
    "CEL_EXPR_PYTHON",
    "CEL_PYTHON",
    "ITERATION_BUDGET",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_SOURCE_CHARS",
    "CelBackend",
    "CelCompileError",
    "CompiledProgram",
    "SharedContext",
    "available_backends",
    "checked_fast_program",
    "evaluator_of",
    "get_backend",
]
