"""The interface every CEL engine offers: compile a source once, evaluate it many times.

Nothing above this package knows which engine runs a condition; the compiler asks a
:class:`CelBackend` for a :class:`CompiledProgram` and the core only ever calls
``evaluate``. Evaluation never fails quietly: an engine error value (a missing map key,
``1 / 0``), an exception, the iteration budget, or a result of the wrong type when the
checker could only say ``dyn`` all raise :class:`EvaluationError`, and the caller applies
the policy's failure mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

from policy_engine.cel.checks import article, label
from policy_engine.errors import EvaluationError
from policy_engine.language.contexts import Variable

CEL_EXPR_PYTHON: Final = "cel-expr-python"
CEL_PYTHON: Final = "cel-python"


@dataclass(frozen=True, slots=True)
class CompiledProgram(ABC):
    """A checked expression, ready to run many times against plain-dict contexts.

    ``variables`` names the top-level variables the expression reads, so the runtime can skip
    building the others. ``result_type`` is set when the checker could not prove the result
    type (``dyn``), and every evaluation then verifies it.
    """

    source: str
    backend: str
    variables: frozenset[str]
    expect: str
    result_type: type | None = field(repr=False, compare=False)
    # Whether evaluating hands the context to an engine that converts it into its own
    # values: such a conversion refuses some JSON values (integers beyond 64 bits, lone
    # surrogates) and reads strings only up to a NUL, so what it reads is checked first.
    converts: ClassVar[bool] = True

    @abstractmethod
    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        """Run against ``activation``; raise :class:`EvaluationError` on any failure."""

    def _mismatch(self, value: Any) -> EvaluationError:
        return EvaluationError(
            f"the expression returned {article(label(value))}, not {article(self.expect)}"
        )


class SharedContext(dict[str, Any]):
    """An activation several programs evaluate in turn, such as one event's.

    An engine that converts the context into its own values keeps that conversion in
    ``converted`` and reuses it, so the event is converted once, however many conditions
    read it; any assignment drops it. Reads are a plain dict's.
    """

    converted: Any = None  # set on the instance once converted; built by dict's own init

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        self.converted = None


class CelBackend(Protocol):
    """One CEL engine: compiles a source against the variables a place in the policy offers."""

    name: str

    def compile(
        self, source: str, variables: Mapping[str, Variable], *, expect: str = "bool"
    ) -> CompiledProgram: ...
