"""The pure-Python engine (``cel-python``) behind the interface, for where no wheel exists.

It has no type checker, so it relies on the tree walk (:mod:`policy_engine.cel.walker`)
for everything it refuses: every name declared, every field selected on a message variable
existing, every function one both engines know, obvious result types. It cannot check
operator and function argument types (``conn.auth_failures > "a"`` compiles and fails at
run time), nor the types of ``map``/``list`` elements and ``dyn`` values. It also refuses
``map()`` with three arguments, which the C++ engine accepts. Its interpreter is metered
here to the C++ engine's iteration budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import celpy
import celpy.adapter
import celpy.celtypes
import celpy.evaluation
from lark import Token, Tree

from policy_engine.cel.checks import (
    BUDGET_MESSAGE,
    ITERATION_BUDGET,
    check_request,
    check_result,
    runtime_check,
)
from policy_engine.cel.program import CEL_PYTHON, CompiledProgram
from policy_engine.cel.walker import analyse
from policy_engine.errors import EvaluationError
from policy_engine.language.contexts import Variable


class _BudgetExceededError(Exception):
    """Not a CELEvalError on purpose: ``exists`` and ``all`` swallow those."""


class _Budget:
    __slots__ = ("remaining",)

    def __init__(self, iterations: int) -> None:
        self.remaining = iterations

    def metered(self, step: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def counted(value: Any) -> Any:
            self.remaining -= 1
            if self.remaining < 0:
                raise _BudgetExceededError(BUDGET_MESSAGE)
            return step(value)

        return counted


class _MeteredEvaluator(celpy.evaluation.Evaluator):
    """celpy's interpreter with the C++ engine's iteration budget on every comprehension."""

    def __init__(
        self, ast: Tree[Token], activation: celpy.evaluation.Activation, budget: _Budget
    ) -> None:
        super().__init__(ast, activation)
        self.budget = budget

    def sub_evaluator(self, ast: Tree[Token]) -> celpy.evaluation.Evaluator:
        return _MeteredEvaluator(ast, self.activation, self.budget)

    def build_macro_eval(self, child: Tree[Token]) -> Callable[[Any], Any]:
        return self.budget.metered(super().build_macro_eval(child))

    def build_ss_macro_eval(self, child: Tree[Token]) -> Callable[[Any], Any]:
        return self.budget.metered(super().build_ss_macro_eval(child))


@dataclass(frozen=True, slots=True)
class _CelpyProgram(CompiledProgram):
    tree: Tree[Token] = field(repr=False, compare=False)
    activation: celpy.evaluation.Activation = field(repr=False, compare=False)

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        missing = [name for name in self.variables if name not in activation]
        if missing:
            raise EvaluationError(f"no value for variable {missing[0]!r}")
        try:
            context = {name: celpy.adapter.json_to_cel(activation[name]) for name in self.variables}
            evaluator = _MeteredEvaluator(self.tree, self.activation, _Budget(ITERATION_BUDGET))
            value = _plain(evaluator.evaluate(context))
        except celpy.evaluation.CELEvalError as exc:
            raise EvaluationError(_celpy_message(exc)) from exc
        except Exception as exc:  # the budget, recursion, and anything the engine lets out
            raise EvaluationError(str(exc) or type(exc).__name__) from exc
        if self.result_type is not None and type(value) is not self.result_type:
            raise self._mismatch(value)
        return value


class CelpyBackend:
    """cel-python, checked by the tree walk and metered to the iteration budget."""

    name = CEL_PYTHON

    def __init__(self) -> None:
        # celpy raises the recursion limit to 2500 here, which its evaluator needs.
        self._environment = celpy.Environment()

    def compile(
        self, source: str, variables: Mapping[str, Variable], *, expect: str = "bool"
    ) -> CompiledProgram:
        check_request(source, expect)
        analysis = analyse(source, variables)
        if analysis.problems:
            raise analysis.problems[0]
        check_result(expect, analysis.kind)
        runner = celpy.InterpretedRunner(self._environment, analysis.tree)
        return _CelpyProgram(
            source=source,
            backend=self.name,
            variables=analysis.variables,
            expect=expect,
            result_type=runtime_check(expect, analysis.kind),
            tree=analysis.tree,
            activation=runner.new_activation(),
        )


def _celpy_message(error: celpy.evaluation.CELEvalError) -> str:
    text = str(error.args[0]) if error.args else repr(error)
    text = _CELPY_RULE.sub(r"'\1'", text)
    return _CELPY_CLASS.sub(lambda match: match[1].removesuffix("Type").lower(), text)


_CELPY_RULE: Final = re.compile(r"Token\('RULE', '(\w+)'\)")
_CELPY_CLASS: Final = re.compile(r"<class 'celpy\.celtypes\.(\w+)'>")


def _plain(value: Any) -> Any:
    """celpy's values subclass Python's; callers get the plain types the C++ engine returns."""
    if isinstance(value, celpy.celtypes.BoolType):
        return bool(value)
    if isinstance(value, bool) or value is None:
        return value
    plain: type[Any]
    for plain in (int, float, str, bytes):
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
