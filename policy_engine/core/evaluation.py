"""Running compiled expressions on the request path, with the policy's failure mode.

A CEL evaluation can fail at run time (a missing map key, a bad type in a ``dyn``
payload, an exhausted iteration budget). Such a failure must never pass for ``false`` by
accident: the rule's failure mode decides whether it then applies or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policy_engine.errors import EvaluationError
from policy_engine.language.model import EvalFailureMode, Expression


def matches(
    expression: Expression, activation: Mapping[str, Any], failure: EvalFailureMode
) -> bool:
    """Whether a condition holds; a failed evaluation counts as ``failure`` says."""
    program = expression.program
    names = expression.event_names
    if names is not None:
        if activation["event"]["name"] not in names:
            return False
        if expression.is_name_test:
            return True
        program = expression.residual or program
    try:
        return program.evaluate(activation) is True
    except EvaluationError:
        return failure is EvalFailureMode.FAIL_CLOSED


def evaluate_value(expression: Expression, activation: Mapping[str, Any]) -> Any:
    """A non-boolean value (a rate-limit key, a priority); raises EvaluationError."""
    path = expression.path
    if path is not None:
        variable = activation.get(path[0])
        if isinstance(variable, dict) and path[1] in variable:
            return variable[path[1]]
    return expression.program.evaluate(activation)
