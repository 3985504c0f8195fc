"""The C++ engine (``cel-expr-python``, Google's CEL with a type checker) behind the interface.

An expression is checked in an environment whose message variables (``conn``, ``event``,
...) are protobuf messages (see :mod:`policy_engine.cel.descriptors`), which gives type
errors with a column. A program checked that way only accepts protobuf messages, so the
same source is compiled again in an environment where every message variable is a
``map(string, dyn)``, which evaluates plain dicts fastest. Environments are cached per
variables declaration. ``has()`` on a message field is always true: contexts carry every
declared field; it is meant for ``claims`` and ``event.payload``.

Programs inside the fast path's subset run as Python closures instead
(:mod:`policy_engine.cel.fastpath`), which give the engine's answers without converting
the context into CEL values on every evaluation.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

from policy_engine.cel.checks import (
    BAD_REGEX,
    BUDGET_MESSAGE,
    MAX_DEPTH,
    RESULT_TYPES,
    SYNTAX,
    TOO_COMPLEX,
    TYPE,
    UNDEFINED_FIELD,
    CelCompileError,
    article,
    check_request,
    check_result,
    container,
    runtime_check,
    undeclared,
    undefined_field,
)
from policy_engine.cel.descriptors import PACKAGE, descriptor_pool_for, scalar
from policy_engine.cel.fastpath import compile_fast
from policy_engine.cel.program import (
    CEL_EXPR_PYTHON,
    CelBackend,
    CompiledProgram,
    SharedContext,
)
from policy_engine.cel.walker import analyse
from policy_engine.errors import EvaluationError
from policy_engine.language.contexts import MessageType, Variable

# Problems the tree walk finds for both engines; the C++ checker finds the others itself.
_BOUND_PROBLEMS: Final = frozenset({BAD_REGEX, TOO_COMPLEX})


@dataclass(frozen=True, slots=True)
class _CelExprProgram(CompiledProgram):
    expression: Any = field(repr=False, compare=False)
    error_type: Any = field(repr=False, compare=False)
    null_type: Any = field(repr=False, compare=False)
    # Set when the checker proved the result is a bool or an int: an error value's plain
    # value is its message, never a bool or an int, so the result's type need not be asked.
    # A proven result is never null.
    proven_type: type | None = field(repr=False, compare=False)
    environment: Any = field(repr=False, compare=False)

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        try:
            if type(activation) is SharedContext:
                converted = activation.converted
                if converted is None:
                    # Converted lazily, map by map, as programs read it; then kept.
                    converted = activation.converted = self.environment.Activation(data=activation)
                result = self.expression.eval(activation=converted)
            else:
                result = self.expression.eval(data=activation)
        except Exception as exc:  # the iteration budget and refused inputs are exceptions
            raise EvaluationError(_engine_message(str(exc))) from exc
        if self.proven_type is not None:
            value = result.plain_value()
            if type(value) is self.proven_type:
                return value
            raise EvaluationError(_engine_message(str(value)))
        kind = result.type()
        if kind == self.error_type:
            raise EvaluationError(_engine_message(str(result.plain_value())))
        if kind == self.null_type:
            # Never convert a null: cel-expr-python 0.1.3 drops a reference to None on every
            # such conversion, and about ten thousand of them abort the interpreter.
            if self.result_type is None:
                return None
            raise EvaluationError(f"the expression returned null, not {article(self.expect)}")
        value = result.plain_value()
        if self.result_type is not None and type(value) is not self.result_type:
            raise self._mismatch(value)
        return value


@dataclass(frozen=True, slots=True)
class _FastProgram(CompiledProgram):
    """A checked expression inside the fast path's subset, run as Python closures.

    ``fastpath`` gives exactly cel-expr-python's answers on that subset (a differential
    test holds it to that).
    """

    evaluator: Callable[[Mapping[str, Any]], Any] = field(repr=False, compare=False)
    converts: ClassVar[bool] = False  # Python closures over the plain values

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        return self.evaluator(activation)


class Evaluable(Protocol):
    def evaluate(self, activation: Mapping[str, Any]) -> Any: ...


def evaluator_of(program: Evaluable) -> Callable[[Mapping[str, Any]], Any]:
    """The callable that evaluates ``program``: the fast path's closure itself where the
    program's ``evaluate`` only forwards to it (one call fewer per evaluation, for callers
    that prepare their conditions once), else ``program.evaluate``."""
    if isinstance(program, _FastProgram):
        return program.evaluator
    return program.evaluate


def checked_fast_program(
    source: str, variables: Mapping[str, Variable], names: frozenset[str], backend: CelBackend
) -> CompiledProgram | None:
    """A bool program for a ``source`` known to type-check, built without checking it again.

    For the operands of an expression that passed the checker (each operand of a checked
    ``&&`` is itself well typed): the fast path's closure, which gives cel-expr-python's
    answers; None when ``backend`` has no fast path or the source is outside its subset.
    ``names`` are the variables it reads.
    """
    if not getattr(backend, "fast_path", False):
        return None
    fast = compile_fast(source, variables, expect="bool")
    if fast is None:
        return None
    return _FastProgram(
        source=source,
        backend=backend.name,
        variables=names,
        expect="bool",
        result_type=None,
        evaluator=fast,
    )


class CelExprBackend:
    """cel-expr-python; with ``fast_path``, programs in the fast path's subset run as closures."""

    name = CEL_EXPR_PYTHON

    def __init__(self, *, fast_path: bool = True) -> None:
        self.fast_path = fast_path
        self._cel = importlib.import_module("cel_expr_python.cel")
        self._bare = self._cel.NewEnv()
        self._environments: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def compile(
        self, source: str, variables: Mapping[str, Variable], *, expect: str = "bool"
    ) -> CompiledProgram:
        check_request(source, expect)
        typed, untyped = self._environments_for(variables)
        try:
            checked = typed.compile(source)
        except RuntimeError as exc:
            raise self._compile_error(source, str(exc), variables) from None
        analysis = analyse(source, variables)
        problem = analysis.first(_BOUND_PROBLEMS)
        if problem is not None:
            raise problem
        kind = _engine_kind(checked.return_type().name())
        check_result(expect, kind)
        fast = compile_fast(source, variables, expect=expect) if self.fast_path else None
        if fast is not None:
            return _FastProgram(
                source=source,
                backend=self.name,
                variables=analysis.variables,
                expect=expect,
                result_type=runtime_check(expect, kind),
                evaluator=fast,
            )
        try:
            expression = untyped.compile(source)
        except RuntimeError as exc:  # never seen: the untyped environment accepts more
            raise self._compile_error(source, str(exc), variables) from None
        proven = expect in ("bool", "int") and kind == expect
        return _CelExprProgram(
            source=source,
            backend=self.name,
            variables=analysis.variables,
            expect=expect,
            result_type=runtime_check(expect, kind),
            expression=expression,
            error_type=self._cel.Type.ERROR,
            null_type=self._cel.Type.NULL,
            proven_type=RESULT_TYPES[expect] if proven else None,
            environment=untyped,
        )

    def _environments_for(self, variables: Mapping[str, Variable]) -> tuple[Any, Any]:
        key = tuple((name, _declaration_key(kind)) for name, kind in sorted(variables.items()))
        pair = self._environments.get(key)
        if pair is None:
            messages = {v.name: v for v in variables.values() if isinstance(v, MessageType)}
            typed = self._cel.NewEnv(
                descriptor_pool=descriptor_pool_for(messages.values()),
                variables={name: self._cel_type(v, typed=True) for name, v in variables.items()},
            )
            untyped = self._cel.NewEnv(
                variables={name: self._cel_type(v, typed=False) for name, v in variables.items()}
            )
            pair = self._environments[key] = (typed, untyped)
        return pair

    def _cel_type(self, variable: Variable, *, typed: bool) -> Any:
        cel_type = self._cel.Type
        if isinstance(variable, MessageType):
            if typed:
                return cel_type(f"{PACKAGE}.{variable.name}")
            return cel_type.Map(cel_type.STRING, cel_type.DYN)
        holder = container(variable)
        if holder is None:
            return getattr(cel_type, scalar(variable).upper())
        if holder[0] == "list":
            return cel_type.List(self._cel_type(holder[1], typed=typed))
        return cel_type.Map(cel_type.STRING, self._cel_type(holder[1], typed=typed))

    def _compile_error(
        self, source: str, text: str, variables: Mapping[str, Variable]
    ) -> CelCompileError:
        match = _ENGINE_ERROR.search(text)
        if "recursion" in text.lower():
            return CelCompileError(
                TOO_COMPLEX, f"the expression nests more than {MAX_DEPTH} levels deep"
            )
        if match is None:
            return CelCompileError(SYNTAX, _engine_message(text))
        offset = _offset(source, int(match["line"]), int(match["column"]))
        message = match["message"].removesuffix(" (in container '')")
        if field_match := _UNDEFINED_FIELD.match(message):
            message_type = _message_named(
                field_match["type"].removeprefix(f"{PACKAGE}."), variables
            )
            if message_type is not None:
                return undefined_field(
                    message_type, field_match["field"], offset, variables, source
                )
            return CelCompileError(UNDEFINED_FIELD, message, offset)
        if name_match := _UNDECLARED.match(message):
            name = name_match["name"]
            called = source[:offset].rstrip().endswith(name) and source[offset:].startswith("(")
            return undeclared(name, offset, variables, call=called)
        try:
            self._bare.compile(source, disable_check=True)
        except RuntimeError:
            return CelCompileError(SYNTAX, _SYNTAX_NOISE.sub("", message), offset)
        return CelCompileError(TYPE, _readable_operators(message), offset)


_ENGINE_ERROR: Final = re.compile(
    r"ERROR: <input>:(?P<line>-?\d+):(?P<column>-?\d+): (?P<message>.*)"
)
_UNDEFINED_FIELD: Final = re.compile(
    r"undefined field '(?P<field>[^']*)' not found in struct '(?P<type>[^']*)'"
)
_UNDECLARED: Final = re.compile(r"undeclared reference to '(?P<name>[^']*)'")
_SYNTAX_NOISE: Final = re.compile(r" expecting (\{[^}]*\}|\S+)")
_STATUS_PREFIX: Final = re.compile(r"^[A-Z_]+: ")
_STATUS_SUFFIX: Final = re.compile(r" \[[A-Z_]+\]$")
# The checker names operators '_>_', '!_', '@in'; operators read better as '>', '!', 'in'.
_OPERATOR_NAME: Final = re.compile(r"'(@in|[^'\w]*(?:_[^'\w]*)+)'")


def _engine_message(text: str) -> str:
    message = _STATUS_SUFFIX.sub("", _STATUS_PREFIX.sub("", text.strip()))
    if message == "Iteration budget exceeded":
        return BUDGET_MESSAGE
    return message


def _readable_operators(message: str) -> str:
    return _OPERATOR_NAME.sub(lambda m: f"'{m[1].replace('_', '').removeprefix('@')}'", message)


def _engine_kind(name: str) -> str:
    """``BOOL``, ``LIST<INT>``, ``pe.Conn`` as the tree walk names them: bool, list, Conn."""
    base = name.split("<", 1)[0]
    return base.lower() if base.isupper() else base.removeprefix(f"{PACKAGE}.")


def _offset(source: str, line: int, column: int) -> int:
    """The engine counts lines and columns from 1, in code points, as Python indexes str."""
    if line < 1 or column < 1:
        return 0
    lines = source.split("\n")
    before = sum(len(text) + 1 for text in lines[: line - 1])
    return min(before + column - 1, len(source))


def _declaration_key(variable: Variable) -> Any:
    if isinstance(variable, MessageType):
        return (variable.name, tuple(variable.fields.items()))
    return variable


def _message_named(name: str, variables: Mapping[str, Variable]) -> MessageType | None:
    return next(
        (v for v in variables.values() if isinstance(v, MessageType) and v.name == name), None
    )
