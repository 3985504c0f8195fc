"""CEL for policies: one small adapter over two engines, so nothing above it knows which runs.

``cel-expr-python`` (Google's C++ CEL, with a type checker) is the engine; ``cel-python``
(pure Python, no checker, about 50 times slower) is the fallback where no wheel exists.
:func:`get_backend` picks one: an explicit name, else ``$POLICY_ENGINE_CEL``, else the C++
engine when it imports.

How the C++ engine is used. An expression is checked in an environment whose message
variables (``conn``, ``event``, ...) are protobuf messages built at run time from
:mod:`policy_engine.language.contexts`: only that makes ``conn.ipp`` or ``conn.auth_failures > "a"``
an error with a column. A program checked that way only accepts protobuf messages, so the
same source is compiled again in an environment where every message variable is a
``map(string, dyn)``, which evaluates plain dicts fastest. Environments are cached per
variables declaration.

Evaluation never fails quietly: an engine error value (a missing map key, ``1 / 0``), an
exception, the iteration budget, or a result of the wrong type when the checker could only
say ``dyn`` (``claims.admin`` as a condition) all raise :class:`EvaluationError`, and the
caller applies the policy's failure mode. ``has()`` on a message field is always true:
contexts carry every declared field; it is meant for ``claims`` and ``event.payload``.

Bounds, because a policy must never stall the event loop (as in Kubernetes' CEL):

* a source longer than ``MAX_SOURCE_CHARS`` is refused (``cel-too-long``);
* the parse tree may hold at most ``MAX_NODES`` operations (literals, names, selections,
  calls, operators) and nest at most ``MAX_DEPTH`` levels (parentheses count; a chain of
  ``||`` or ``&&`` counts once, as the C++ parser balances it; its own limit is 32 too) and
  ``MAX_TREE_DEPTH`` raw grammar levels (the Python engine evaluates recursively);
* cost model, in comprehension iterations, the unit both engines' run-time budget counts:
  a comprehension (``all``, ``exists``, ``exists_one``, ``map``, ``filter``) over a list or
  map literal of n elements costs ``n * (1 + cost of its body)``; over anything else (a
  context field, ``event.payload``) its size is unknown until run time. A comprehension
  inside a comprehension over such a runtime list is refused (its cost has no bound); a
  single one is fine, as is one over a literal inside it. Estimates above
  ``ITERATION_BUDGET`` are refused (``cel-too-complex``): they would fail at run time.
* at run time both engines stop after ``ITERATION_BUDGET`` iterations per evaluation (the
  C++ engine's built-in budget; the Python engine is metered here to the same figure).
  The budget bounds time, but not always to a small figure. Measured with cel-expr-python
  0.1.3: ``exists``/``all`` over 10,000 elements take 2 ms, but ``map``/``filter`` copy
  their result at every step, so their time grows with the square of the list: 20 ms at
  1,000 elements, 2.8 s at 10,000. The Python engine spends about 0.1 ms per iteration.
  Over lists a client controls, prefer ``exists``/``all`` and bound the list's size in the
  event's schema.

``matches()`` with a literal pattern is compiled at compile time with RE2 (the library
both engines use), so a broken regex is ``cel-bad-regex`` before it ever runs.

What the fallback cannot check, because it has no type checker: operator and function
argument types (``conn.auth_failures > "a"`` compiles and fails at run time, ``cel-type``
is never raised), the types of ``map``/``list`` elements and of ``dyn`` values, and the
result type beyond what literals, operators and declared fields show. It does check that
every name is declared (or a comprehension variable), every field selected on a message
variable exists, every function is one both engines know, and obvious result types. It
also rejects ``map()`` with three arguments, which the C++ engine accepts.

Both engines read expressions with celpy's grammar for these checks, so an expression the
C++ parser accepts but that grammar does not is ``cel-syntax`` on both: a policy that
validates with one engine runs with the other.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any, Final, Protocol

import celpy
import celpy.adapter
import celpy.celparser
import celpy.celtypes
import celpy.evaluation
from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2
from lark import Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedToken
from lark.tree import Branch

from policy_engine.cel.fastpath import compile_fast
from policy_engine.cel.grammar import parser
from policy_engine.errors import EvaluationError, PolicyEngineError
from policy_engine.language.contexts import MessageType, Variable

CEL_EXPR_PYTHON: Final = "cel-expr-python"
CEL_PYTHON: Final = "cel-python"
BACKEND_ENV_VAR: Final = "POLICY_ENGINE_CEL"

MAX_SOURCE_CHARS: Final = 2048
MAX_NODES: Final = 500
MAX_DEPTH: Final = 32
MAX_TREE_DEPTH: Final = 400
ITERATION_BUDGET: Final = 10_000

SYNTAX: Final = "cel-syntax"
UNDEFINED_FIELD: Final = "cel-undefined-field"
UNDECLARED: Final = "cel-undeclared"
TYPE: Final = "cel-type"
RETURN_TYPE: Final = "cel-return-type"
TOO_LONG: Final = "cel-too-long"
TOO_COMPLEX: Final = "cel-too-complex"
BAD_REGEX: Final = "cel-bad-regex"

EXPECTS: Final = frozenset({"bool", "int", "string", "dyn"})
_RESULT_TYPES: Final[Mapping[str, type]] = {"bool": bool, "int": int, "string": str}
# Problems the analysis finds for both engines; the C++ checker finds the others itself.
_BOUND_PROBLEMS: Final = frozenset({BAD_REGEX, TOO_COMPLEX})
_PROBLEM_RANK: Final[Mapping[str, int]] = {BAD_REGEX: 1, TOO_COMPLEX: 2}

_MACROS: Final = frozenset({"all", "exists", "exists_one", "map", "filter"})
# Functions and methods both engines provide out of the box, with their result types.
_CALL_KINDS: Final[Mapping[str, str | None]] = {
    **dict.fromkeys(("contains", "startsWith", "endsWith", "matches", "bool"), "bool"),
    **dict.fromkeys(("size", "int", "getDate", "getDayOfMonth", "getDayOfWeek"), "int"),
    **dict.fromkeys(("getDayOfYear", "getFullYear", "getHours", "getMilliseconds"), "int"),
    **dict.fromkeys(("getMinutes", "getMonth", "getSeconds"), "int"),
    **{name: name for name in ("uint", "double", "string", "bytes", "type", "duration")},
    "timestamp": "timestamp",
    "dyn": None,
}
_LITERAL_KINDS: Final[Mapping[str, str]] = {
    "INT_LIT": "int",
    "UINT_LIT": "uint",
    "FLOAT_LIT": "double",
    "STRING_LIT": "string",
    "MLSTRING_LIT": "string",
    "BYTES_LIT": "bytes",
    "BOOL_LIT": "bool",
    "NULL_LIT": "null",
}


class CelCompileError(PolicyEngineError):
    """An expression refused at compile time; ``offset`` is 0-based into its source."""

    def __init__(self, code: str, message: str, offset: int = 0, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.offset = offset
        self.hint = hint

    def __repr__(self) -> str:
        return f"CelCompileError({self.code!r}, {self.message!r}, {self.offset}, {self.hint!r})"


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

    @abstractmethod
    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        """Run against ``activation``; raise :class:`EvaluationError` on any failure."""

    def _mismatch(self, value: Any) -> EvaluationError:
        actual = _RESULT_LABELS.get(type(value), type(value).__name__)
        return EvaluationError(f"the expression returned {_a(actual)}, not {_a(self.expect)}")


class CelBackend(Protocol):
    """One CEL engine: compiles a source against the variables a place in the policy offers."""

    name: str

    def compile(
        self, source: str, variables: Mapping[str, Variable], *, expect: str = "bool"
    ) -> CompiledProgram: ...


_RESULT_LABELS: Final[Mapping[type, str]] = {
    bool: "bool",
    int: "int",
    float: "double",
    str: "string",
    bytes: "bytes",
    list: "list",
    dict: "map",
    type(None): "null",
}


def available_backends() -> tuple[str, ...]:
    """The engines importable here, preferred first."""
    return tuple(name for name in _FACTORIES if _importable(name))


def get_backend(name: str | None = None, *, fast_path: bool = True) -> CelBackend:
    """The named engine, else ``$POLICY_ENGINE_CEL``, else the best one installed.

    With ``fast_path`` (the default), cel-expr-python programs inside the fast path's
    subset run as Python closures with the same results; ``fast_path=False`` gives the
    engine alone, the reference those closures are tested against.
    """
    chosen = name or os.environ.get(BACKEND_ENV_VAR) or None
    if chosen is None:
        chosen = CEL_EXPR_PYTHON if _importable(CEL_EXPR_PYTHON) else CEL_PYTHON
    factory = _FACTORIES.get(chosen)
    if factory is None:
        known = ", ".join(_FACTORIES)
        raise PolicyEngineError(f"unknown CEL engine {chosen!r}; expected one of: {known}")
    key = (chosen, fast_path and chosen == CEL_EXPR_PYTHON)
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(key)
        if backend is None:
            if not _importable(chosen):
                raise PolicyEngineError(f"the CEL engine {chosen!r} is not installed here")
            backend = _BACKENDS[key] = factory()
            if isinstance(backend, _CelExprBackend):
                backend.fast_path = key[1]
    return backend


@cache
def _importable(name: str) -> bool:
    try:
        importlib.import_module(_MODULES[name])
    except (ImportError, OSError):
        return False
    return True


# --- the C++ engine --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CelExprProgram(CompiledProgram):
    expression: Any = field(repr=False, compare=False)
    error_type: Any = field(repr=False, compare=False)
    null_type: Any = field(repr=False, compare=False)
    # Set when the checker proved the result is a bool or an int: an error value's plain
    # value is its message, never a bool or an int, so the result's type need not be asked
    # (0.5 us of about 5). A proven result is never null.
    proven_type: type | None = field(repr=False, compare=False)

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        try:
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
            raise EvaluationError(f"the expression returned null, not {_a(self.expect)}")
        value = result.plain_value()
        if self.result_type is not None and type(value) is not self.result_type:
            raise self._mismatch(value)
        return value


@dataclass(frozen=True, slots=True)
class _FastProgram(CompiledProgram):
    """A checked expression inside the fast path's subset, run as Python closures.

    ``fastpath`` gives exactly cel-expr-python's answers on that subset (a differential
    test holds it to that) in a tenth of a microsecond instead of several.
    """

    evaluator: Callable[[Mapping[str, Any]], Any] = field(repr=False, compare=False)

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        return self.evaluator(activation)


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


class _CelExprBackend:
    name = CEL_EXPR_PYTHON

    def __init__(self) -> None:
        self.fast_path = True
        self._cel = importlib.import_module("cel_expr_python.cel")
        self._bare = self._cel.NewEnv()
        self._environments: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def compile(
        self, source: str, variables: Mapping[str, Variable], *, expect: str = "bool"
    ) -> CompiledProgram:
        _check_request(source, expect)
        typed, untyped = self._environments_for(variables)
        try:
            checked = typed.compile(source)
        except RuntimeError as exc:
            raise self._compile_error(source, str(exc), variables) from None
        analysis = _analyse(source, variables, positions=False)
        problem = analysis.first(_BOUND_PROBLEMS)
        if problem is not None:
            raise problem
        kind = _engine_kind(checked.return_type().name())
        _check_result(expect, kind)
        fast = compile_fast(source, variables, expect=expect) if self.fast_path else None
        if fast is not None:
            return _FastProgram(
                source=source,
                backend=self.name,
                variables=analysis.variables,
                expect=expect,
                result_type=_runtime_check(expect, kind),
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
            result_type=_runtime_check(expect, kind),
            expression=expression,
            error_type=self._cel.Type.ERROR,
            null_type=self._cel.Type.NULL,
            proven_type=_RESULT_TYPES[expect] if proven else None,
        )

    def _environments_for(self, variables: Mapping[str, Variable]) -> tuple[Any, Any]:
        key = tuple((name, _declaration_key(kind)) for name, kind in sorted(variables.items()))
        pair = self._environments.get(key)
        if pair is None:
            messages = {v.name: v for v in variables.values() if isinstance(v, MessageType)}
            typed = self._cel.NewEnv(
                descriptor_pool=_descriptor_pool(messages.values()),
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
                return cel_type(f"{_PACKAGE}.{variable.name}")
            return cel_type.Map(cel_type.STRING, cel_type.DYN)
        container = _container(variable)
        if container is None:
            return getattr(cel_type, _scalar(variable).upper())
        if container[0] == "list":
            return cel_type.List(self._cel_type(container[1], typed=typed))
        return cel_type.Map(cel_type.STRING, self._cel_type(container[1], typed=typed))

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
                field_match["type"].removeprefix(f"{_PACKAGE}."), variables
            )
            if message_type is not None:
                return _undefined_field(
                    message_type, field_match["field"], offset, variables, source
                )
            return CelCompileError(UNDEFINED_FIELD, message, offset)
        if name_match := _UNDECLARED.match(message):
            name = name_match["name"]
            called = source[:offset].rstrip().endswith(name) and source[offset:].startswith("(")
            return _undeclared(name, offset, variables, call=called)
        try:
            self._bare.compile(source, disable_check=True)
        except RuntimeError:
            return CelCompileError(SYNTAX, _SYNTAX_NOISE.sub("", message), offset)
        return CelCompileError(TYPE, _readable_operators(message), offset)


_PACKAGE: Final = "pe"
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
        return _BUDGET_MESSAGE
    return message


def _readable_operators(message: str) -> str:
    return _OPERATOR_NAME.sub(lambda m: f"'{m[1].replace('_', '').removeprefix('@')}'", message)


def _engine_kind(name: str) -> str:
    """``BOOL``, ``LIST<INT>``, ``pe.Conn`` as the analysis names them: bool, list, Conn."""
    base = name.split("<", 1)[0]
    return base.lower() if base.isupper() else base.removeprefix(f"{_PACKAGE}.")


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


def _descriptor_pool(messages: Iterable[MessageType]) -> descriptor_pool.DescriptorPool:
    """Message types for the checker: one proto3 file per context message, package ``pe``."""
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)
    for message in messages:
        pool.Add(_message_file(message))
    return pool


_FIELD = descriptor_pb2.FieldDescriptorProto
_SCALAR_FIELDS: Final[Mapping[str, Any]] = {
    "string": _FIELD.TYPE_STRING,
    "int": _FIELD.TYPE_INT64,
    "bool": _FIELD.TYPE_BOOL,
    "double": _FIELD.TYPE_DOUBLE,
}


def _message_file(message: MessageType) -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{_PACKAGE}/{message.name}.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[struct_pb2.DESCRIPTOR.name],
    )
    proto = file.message_type.add(name=message.name)
    for number, (name, kind) in enumerate(message.fields.items(), start=1):
        container = _container(kind)
        if container is None:
            _set_scalar(proto.field.add(name=name, number=number), kind)
        elif container[0] == "list":
            repeated = proto.field.add(name=name, number=number, label=_FIELD.LABEL_REPEATED)
            _set_scalar(repeated, container[1])
        else:
            entry_name = "".join(part[:1].upper() + part[1:] for part in name.split("_"))
            entry = proto.nested_type.add(name=f"{entry_name}Entry")  # protobuf's own naming
            entry.options.map_entry = True
            _set_scalar(entry.field.add(name="key", number=1), "string")
            _set_scalar(entry.field.add(name="value", number=2), container[1])
            proto.field.add(
                name=name,
                number=number,
                label=_FIELD.LABEL_REPEATED,
                type=_FIELD.TYPE_MESSAGE,
                type_name=f".{_PACKAGE}.{message.name}.{entry.name}",
            )
    return file


def _set_scalar(proto_field: descriptor_pb2.FieldDescriptorProto, kind: str) -> None:
    if not proto_field.HasField("label"):
        proto_field.label = _FIELD.LABEL_OPTIONAL
    if _scalar(kind) == "dyn":
        proto_field.type = _FIELD.TYPE_MESSAGE
        proto_field.type_name = ".google.protobuf.Value"
    else:
        proto_field.type = _SCALAR_FIELDS[_scalar(kind)]


def _scalar(kind: str) -> str:
    if kind not in _SCALAR_FIELDS and kind != "dyn":
        raise ValueError(f"unsupported context field type {kind!r}")
    return kind


# --- the pure-Python engine ------------------------------------------------------------------

_BUDGET_MESSAGE: Final = f"iteration budget exceeded ({ITERATION_BUDGET} per evaluation)"


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
                raise _BudgetExceededError(_BUDGET_MESSAGE)
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


class _CelpyBackend:
    name = CEL_PYTHON

    def __init__(self) -> None:
        # celpy raises the recursion limit to 2500 here, which its evaluator needs.
        self._environment = celpy.Environment()

    def compile(
        self, source: str, variables: Mapping[str, Variable], *, expect: str = "bool"
    ) -> CompiledProgram:
        _check_request(source, expect)
        analysis = _analyse(source, variables, positions=True)
        if analysis.problems:
            raise analysis.problems[0]
        _check_result(expect, analysis.kind)
        runner = celpy.InterpretedRunner(self._environment, analysis.tree)
        return _CelpyProgram(
            source=source,
            backend=self.name,
            variables=analysis.variables,
            expect=expect,
            result_type=_runtime_check(expect, analysis.kind),
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


# --- checks both engines share ---------------------------------------------------------------


def _check_request(source: str, expect: str) -> None:
    if expect not in EXPECTS:
        raise ValueError(f"expect must be one of {sorted(EXPECTS)}, not {expect!r}")
    if len(source) > MAX_SOURCE_CHARS:
        raise CelCompileError(
            TOO_LONG,
            f"the expression is {len(source)} characters long; the limit is {MAX_SOURCE_CHARS}",
            MAX_SOURCE_CHARS,
        )


def _check_result(expect: str, kind: str) -> None:
    if expect == "dyn" or kind in ("dyn", expect):
        return
    noun = "condition" if expect == "bool" else "value"
    raise CelCompileError(
        RETURN_TYPE, f"this {noun} must be {_a(expect)}, but the expression is {_a(kind)}"
    )


def _runtime_check(expect: str, kind: str) -> type | None:
    if expect in ("dyn", kind):
        return None
    return _RESULT_TYPES[expect]


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in tuple('aeio') else 'a'} {word}"


def _undeclared(
    name: str, offset: int, variables: Mapping[str, Variable], *, call: bool
) -> CelCompileError:
    if call:
        guess = _closest(name, (*_CALL_KINDS, *_MACROS, "has"))
        hint = f"did you mean `{guess}`?" if guess else ""
        return CelCompileError(UNDECLARED, f"unknown function '{name}'", offset, hint)
    guess = _closest(name.split(".", 1)[0], variables)
    hint = (
        f"did you mean `{guess}`?"
        if guess
        else f"this expression can use: {', '.join(sorted(variables))}"
    )
    return CelCompileError(UNDECLARED, f"undeclared reference to '{name}'", offset, hint)


def _undefined_field(
    message_type: MessageType,
    name: str,
    offset: int,
    variables: Mapping[str, Variable],
    source: str,
) -> CelCompileError:
    owners = [n for n, v in variables.items() if v == message_type] or [message_type.name]
    before = source[:offset].rstrip()
    owner = next((n for n in owners if before.endswith(n)), owners[0])
    guess = _closest(name, message_type.fields)
    hint = (
        f"did you mean `{owner}.{guess}`?"
        if guess
        else f"`{owner}` has: {', '.join(message_type.fields)}"
    )
    return CelCompileError(UNDEFINED_FIELD, f"`{owner}` has no field '{name}'", offset, hint)


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return found[0] if found else None


def _message_named(name: str, variables: Mapping[str, Variable]) -> MessageType | None:
    return next(
        (v for v in variables.values() if isinstance(v, MessageType) and v.name == name), None
    )


def _container(kind: Variable | None) -> tuple[str, str] | None:
    """``("list", T)`` for ``list<T>``, ``("map", T)`` for ``map<string,T>``, else None."""
    if not isinstance(kind, str) or not kind.endswith(">"):
        return None
    if kind.startswith("list<"):
        return "list", kind[5:-1].strip()
    if kind.startswith("map<"):
        key, _, value = kind[4:-1].partition(",")
        if key.strip() != "string":
            raise ValueError(f"map keys must be strings, not in {kind!r}")
        return "map", value.strip()
    return None


def _regex_problem(pattern: str) -> str | None:
    re2 = _re2()
    if re2 is None:
        try:
            re.compile(pattern)
        except re.error as exc:
            return str(exc)
        return None
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    return None


@cache
def _re2() -> ModuleType | None:
    try:
        return importlib.import_module("re2")
    except ImportError:
        return None


# --- the parse tree --------------------------------------------------------------------------

# Single-child grammar levels that carry no operation of their own.
_WRAPPERS: Final = frozenset(
    {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication"}
    | {"unary", "member", "primary", "paren_expr"}
)
_ALWAYS_OPERATIONS: Final = frozenset(
    {"literal", "ident", "dot_ident", "ident_arg", "dot_ident_arg", "member_dot"}
    | {"member_dot_arg", "member_index", "member_object", "list_lit", "map_lit"}
)
_BALANCED: Final = frozenset({"conditionalor", "conditionaland"})
# Words CEL keeps for itself; celpy's grammar reads them as names.
_RESERVED: Final = frozenset(
    {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let"}
    | {"loop", "package", "namespace", "return", "var", "void", "while"}
)


def _parse(source: str, *, positions: bool) -> Tree[Token]:
    try:
        return parser(positions=positions).parse(source)
    except UnexpectedCharacters as exc:
        offset = exc.pos_in_stream or 0
        character = source[offset : offset + 1]
        raise CelCompileError(
            SYNTAX, f"Syntax error: unexpected character {character!r}", offset
        ) from None
    except UnexpectedToken as exc:
        token = exc.token
        if token.type == "$END":
            raise CelCompileError(
                SYNTAX, "Syntax error: the expression ends too early", len(source)
            ) from None
        raise CelCompileError(
            SYNTAX, f"Syntax error: unexpected {str(token)!r}", _start(token)
        ) from None
    except UnexpectedEOF:
        raise CelCompileError(
            SYNTAX, "Syntax error: the expression ends too early", len(source)
        ) from None
    except LarkError as exc:
        raise CelCompileError(SYNTAX, f"Syntax error: {exc}") from None


def _check_shape(tree: Tree[Token]) -> None:
    """Iterative on purpose: it guards the recursive passes that follow."""
    nodes = depth = tree_depth = 0
    stack: list[tuple[Tree[Token], int, int, bool]] = [(tree, 0, 1, False)]
    while stack:
        node, level, height, continues_chain = stack.pop()
        operation = _is_operation(node)
        nodes += operation
        if (operation and not continues_chain) or node.data == "paren_expr":
            level += 1
        depth = max(depth, level)
        tree_depth = max(tree_depth, height)
        for index, child in enumerate(node.children):
            if isinstance(child, Tree):
                chain = (
                    index == 0
                    and node.data in _BALANCED
                    and child.data == node.data
                    and len(node.children) > 1
                )
                stack.append((child, level, height + 1, chain))
    if nodes > MAX_NODES:
        raise CelCompileError(
            TOO_COMPLEX, f"the expression has {nodes} operations; the limit is {MAX_NODES}"
        )
    if depth > MAX_DEPTH or tree_depth > MAX_TREE_DEPTH:
        raise CelCompileError(
            TOO_COMPLEX,
            f"the expression nests more than {MAX_DEPTH} levels deep",
            hint="split it, or use `in` with a list instead of a long chain of `+` or `==`",
        )


def _is_operation(node: Tree[Token]) -> bool:
    if node.data in _ALWAYS_OPERATIONS:
        return True
    return node.data in _WRAPPERS and node.data != "paren_expr" and len(node.children) > 1


def _unwrap(node: Branch[Token]) -> Branch[Token]:
    while isinstance(node, Tree) and node.data in _WRAPPERS and len(node.children) == 1:
        node = node.children[0]
    return node


def _start(token: Token) -> int:
    return token.start_pos or 0


def _call_offset(source: str, name: Token) -> int:
    """The C++ engine places a call at its opening parenthesis."""
    found = source.find("(", name.end_pos or 0)
    return found if found >= 0 else _start(name)


def _dot_offset(source: str, name: Token) -> int:
    """The C++ engine places a field selection at its dot."""
    found = source.rfind(".", 0, _start(name))
    return found if found >= 0 else _start(name)


def _arguments(node: Tree[Token], index: int) -> list[Branch[Token]]:
    if len(node.children) > index and isinstance(arguments := node.children[index], Tree):
        return list(arguments.children)
    return []


def _token(branch: Branch[Token]) -> Token:
    if not isinstance(branch, Token):
        raise TypeError(f"expected a token, got {branch!r}")
    return branch


def _first_token(node: Tree[Token]) -> Token | None:
    return next((t for t in node.scan_values(lambda v: isinstance(v, Token))), None)


# --- analysis --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the walker knows of a sub-expression: its type if static, its size if a literal."""

    kind: Variable | None = None
    size: int | None = None


_UNKNOWN: Final = _Facts()


@dataclass(frozen=True, slots=True)
class _Analysis:
    tree: Tree[Token]
    variables: frozenset[str]
    kind: str
    problems: tuple[CelCompileError, ...]

    def first(self, codes: Collection[str]) -> CelCompileError | None:
        return next((p for p in self.problems if p.code in codes), None)


def _analyse(source: str, variables: Mapping[str, Variable], *, positions: bool) -> _Analysis:
    tree = _parse(source, positions=positions)
    _check_shape(tree)
    walker = _Walker(source, variables)
    facts = walker.visit(tree)
    problems = sorted(walker.problems, key=lambda p: (_PROBLEM_RANK.get(p.code, 0), p.offset))
    return _Analysis(tree, frozenset(walker.referenced), _kind_label(facts.kind), tuple(problems))


def _kind_label(kind: Variable | None) -> str:
    if kind is None:
        return "dyn"
    if isinstance(kind, MessageType):
        return kind.name
    return kind.split("<", 1)[0]


class _Walker:
    """One pass: referenced names, result type, and every problem, in the C++ engine's terms."""

    def __init__(self, source: str, variables: Mapping[str, Variable]) -> None:
        self.source = source
        self.variables = variables
        self.referenced: set[str] = set()
        self.problems: list[CelCompileError] = []
        self.iterations = 0  # the static worst case; sizes known only at run time count 0
        self.comprehensions = 0
        self._scope: list[str] = []
        self._over_budget = False

    def visit(self, branch: Branch[Token]) -> _Facts:
        node = _unwrap(branch)
        if not isinstance(node, Tree):
            return _UNKNOWN
        handler: Callable[[Tree[Token]], _Facts] | None = getattr(self, f"_on_{node.data}", None)
        if handler is None:
            for child in node.children:
                self.visit(child)
            return _UNKNOWN
        return handler(node)

    def _on_literal(self, node: Tree[Token]) -> _Facts:
        return _Facts(_LITERAL_KINDS.get(_token(node.children[0]).type))

    def _on_ident(self, node: Tree[Token]) -> _Facts:
        return self._name(_token(node.children[0]), root=False)

    def _on_dot_ident(self, node: Tree[Token]) -> _Facts:
        return self._name(_token(node.children[0]), root=True)

    def _name(self, token: Token, *, root: bool) -> _Facts:
        name = str(token)
        if name in _RESERVED:
            self.problems.append(
                CelCompileError(SYNTAX, f"reserved identifier: {name}", _start(token))
            )
            return _UNKNOWN
        if not root and name in self._scope:
            return _UNKNOWN
        variable = self.variables.get(name)
        if variable is None:
            self.problems.append(_undeclared(name, _start(token), self.variables, call=False))
            return _UNKNOWN
        self.referenced.add(name)
        return _Facts(None if variable == "dyn" else variable)

    def _on_member_dot(self, node: Tree[Token], offset: int | None = None) -> _Facts:
        receiver, name = node.children[0], _token(node.children[1])
        at = _dot_offset(self.source, name) if offset is None else offset
        chain = self._select_chain(node)
        if chain is not None and chain[0] not in self._scope and chain[0] not in self.variables:
            self.problems.append(_undeclared(".".join(chain), at, self.variables, call=False))
            return _UNKNOWN
        kind = self.visit(receiver).kind
        if isinstance(kind, MessageType):
            field_kind = kind.fields.get(str(name))
            if field_kind is None:
                self.problems.append(
                    _undefined_field(kind, str(name), at, self.variables, self.source)
                )
                return _UNKNOWN
            return _Facts(None if field_kind == "dyn" else field_kind)
        container = _container(kind)
        if container is not None and container[0] == "map":
            return _Facts(container[1])
        return _UNKNOWN

    @staticmethod
    def _select_chain(node: Tree[Token]) -> list[str] | None:
        """``a.b.c`` as names when it is only selections on a bare name, as the checker reads it."""
        names: list[str] = []
        current: Branch[Token] = node
        while isinstance(current, Tree) and current.data == "member_dot":
            names.append(str(current.children[1]))
            current = _unwrap(current.children[0])
        if isinstance(current, Tree) and current.data == "ident":
            names.append(str(current.children[0]))
            return names[::-1]
        return None

    def _on_member_index(self, node: Tree[Token]) -> _Facts:
        kind = self.visit(node.children[0]).kind
        self.visit(node.children[1])
        container = _container(kind)
        return _Facts(container[1]) if container is not None else _UNKNOWN

    def _on_member_object(self, node: Tree[Token]) -> _Facts:
        token = _first_token(node)
        name = str(token) if token is not None else "?"
        offset = _start(token) if token is not None else 0
        self.problems.append(_undeclared(name, offset, self.variables, call=False))
        return _UNKNOWN

    def _on_ident_arg(self, node: Tree[Token]) -> _Facts:
        name = _token(node.children[0])
        arguments = _arguments(node, 1)
        if name == "has":
            return self._has(name, arguments)
        return self._call(name, None, arguments)

    _on_dot_ident_arg = _on_ident_arg

    def _on_member_dot_arg(self, node: Tree[Token]) -> _Facts:
        name = _token(node.children[1])
        arguments = _arguments(node, 2)
        if name in _MACROS:
            return self._comprehension(name, node.children[0], arguments)
        return self._call(name, node.children[0], arguments)

    def _call(
        self, name: Token, receiver: Branch[Token] | None, arguments: list[Branch[Token]]
    ) -> _Facts:
        if name not in _CALL_KINDS:
            offset = _call_offset(self.source, name)
            self.problems.append(_undeclared(str(name), offset, self.variables, call=True))
            return _UNKNOWN
        if receiver is not None:
            self.visit(receiver)
        for argument in arguments:
            self.visit(argument)
        if name == "matches" and arguments:
            self._check_regex(arguments[-1])
        return _Facts(_CALL_KINDS[name])

    def _has(self, name: Token, arguments: list[Branch[Token]]) -> _Facts:
        offset = _call_offset(self.source, name)
        if len(arguments) != 1:
            self.problems.append(_undeclared("has", offset, self.variables, call=True))
            return _UNKNOWN
        target = _unwrap(arguments[0])
        if not (isinstance(target, Tree) and target.data == "member_dot"):
            message = "has() takes one field selection, such as has(claims.role)"
            self.problems.append(CelCompileError(SYNTAX, message, self._position(target, offset)))
        else:
            self._on_member_dot(target, offset)
        return _Facts("bool")

    @staticmethod
    def _position(branch: Branch[Token], default: int) -> int:
        token = branch if isinstance(branch, Token) else _first_token(branch)
        return default if token is None else _start(token)

    def _comprehension(
        self, name: Token, receiver: Branch[Token], arguments: list[Branch[Token]]
    ) -> _Facts:
        offset = _start(name)
        range_facts = self.visit(receiver)
        if not (len(arguments) == 2 or (name == "map" and len(arguments) == 3)):
            for argument in arguments:  # not a macro, so a call to an unknown function
                self.visit(argument)
            self.problems.append(
                _undeclared(str(name), _call_offset(self.source, name), self.variables, call=True)
            )
            return _UNKNOWN
        variable = _unwrap(arguments[0])
        if not (isinstance(variable, Tree) and variable.data == "ident"):
            message = f"{name}() variable name must be a simple identifier"
            self.problems.append(CelCompileError(SYNTAX, message, self._position(variable, offset)))
            return _UNKNOWN
        if len(arguments) == 3:
            message = "map() with a filter is not supported by cel-python; use filter() first"
            self.problems.append(CelCompileError(SYNTAX, message, offset))
        outer_iterations, outer_comprehensions = self.iterations, self.comprehensions
        self.iterations = self.comprehensions = 0
        self._scope.append(str(variable.children[0]))
        for body in arguments[1:]:
            self.visit(body)
        self._scope.pop()
        size, nested = range_facts.size, self.comprehensions
        inner = 0 if size is None else size * (1 + self.iterations)
        self.iterations = outer_iterations + inner
        self.comprehensions = outer_comprehensions + nested + 1
        if size is None and nested:
            self.problems.append(
                CelCompileError(
                    TOO_COMPLEX,
                    f"a comprehension inside {name}() over a list known only at run time has "
                    "no bound on its cost",
                    offset,
                    "test the inner condition with `in`, or precompute the inner list",
                )
            )
        elif self.iterations > ITERATION_BUDGET and not self._over_budget:
            self._over_budget = True
            self.problems.append(
                CelCompileError(
                    TOO_COMPLEX,
                    f"the comprehensions would run {self.iterations} iterations; the budget "
                    f"is {ITERATION_BUDGET} per evaluation",
                    offset,
                )
            )
        if name in ("map", "filter"):
            return _Facts("list", size)
        return _Facts("bool")

    def _check_regex(self, argument: Branch[Token]) -> None:
        node = _unwrap(argument)
        if not (isinstance(node, Tree) and node.data == "literal"):
            return
        token = _token(node.children[0])
        if token.type not in ("STRING_LIT", "MLSTRING_LIT"):
            return
        pattern = str(celpy.evaluation.celstr(token))
        problem = _regex_problem(pattern)
        if problem is not None:
            message = f"invalid regular expression {pattern!r}: {problem}"
            self.problems.append(CelCompileError(BAD_REGEX, message, _start(token)))

    def _on_list_lit(self, node: Tree[Token]) -> _Facts:
        elements = _arguments(node, 0)
        for element in elements:
            self.visit(element)
        return _Facts("list", len(elements))

    def _on_map_lit(self, node: Tree[Token]) -> _Facts:
        entries = _arguments(node, 0)
        for entry in entries:
            self.visit(entry)
        return _Facts("map", len(entries) // 2)

    def _on_expr(self, node: Tree[Token]) -> _Facts:
        condition, then, otherwise = node.children
        self.visit(condition)
        then_kind, otherwise_kind = self.visit(then).kind, self.visit(otherwise).kind
        return _Facts(then_kind if then_kind == otherwise_kind else None)

    def _on_conditionalor(self, node: Tree[Token]) -> _Facts:
        operands: list[Branch[Token]] = []
        current: Branch[Token] = node
        while (
            isinstance(current, Tree) and current.data == node.data and len(current.children) == 2
        ):
            operands.append(current.children[1])
            current = current.children[0]
        for operand in (current, *reversed(operands)):
            self.visit(operand)
        return _Facts("bool")

    _on_conditionaland = _on_conditionalor

    def _on_relation(self, node: Tree[Token]) -> _Facts:
        self._operands(node)
        return _Facts("bool")

    def _on_addition(self, node: Tree[Token]) -> _Facts:
        left, right = self._operands(node)
        return _Facts(left if left == right and isinstance(left, str) else None)

    _on_multiplication = _on_addition

    def _on_unary(self, node: Tree[Token]) -> _Facts:
        operator, operand = node.children
        kind = self.visit(operand).kind
        negation = isinstance(operator, Tree) and operator.data == "unary_not"
        return _Facts("bool" if negation else kind)

    def _operands(self, node: Tree[Token]) -> tuple[Variable | None, Variable | None]:
        operator, right = node.children
        left = operator.children[0] if isinstance(operator, Tree) else operator
        return self.visit(left).kind, self.visit(right).kind


_MODULES: Final[Mapping[str, str]] = {
    CEL_EXPR_PYTHON: "cel_expr_python.cel",
    CEL_PYTHON: "celpy",
}
_FACTORIES: Final[Mapping[str, Callable[[], CelBackend]]] = {
    CEL_EXPR_PYTHON: _CelExprBackend,
    CEL_PYTHON: _CelpyBackend,
}
_BACKENDS: dict[tuple[str, bool], CelBackend] = {}
_BACKENDS_LOCK: Final = threading.Lock()
