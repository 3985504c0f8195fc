"""Error classification: from a live exception to a category, a code and client advice.

The classifier sees an exception the way an operator thinks about it: its type name and
the names of its base classes (so ``"TimeoutError" in error.types`` catches every
subclass), its module, its message, and the well-known attributes libraries use for
status codes. The first rule that matches wins; a built-in ``INTERNAL`` classification
catches whatever no rule does, so the engine always has an answer; an application's own
``ConnectionRefusedError`` that no rule classifies is a plain, non-retryable refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policy_engine.core.evaluation import matches
from policy_engine.core.payload import (
    CONNECTION_REFUSED,
    INTERNAL,
    ClientPayload,
    Notice,
    backoff_for,
    client_payload,
)
from policy_engine.core.recorder import NULL_RECORDER, Recorder
from policy_engine.language.model import (
    BackoffSpec,
    Category,
    ErrorSeverity,
    EvalFailureMode,
    PolicySet,
)

MAX_MESSAGE_CHARS = 1024
_STATUS_ATTRIBUTES = ("status_code", "status", "http_status", "code", "errno")


@dataclass(frozen=True, slots=True)
class Classification:
    rule: str
    category: Category
    severity: ErrorSeverity
    code: str
    message: str
    retryable: bool
    backoff: BackoffSpec | None
    retry_after: float | None
    alert: bool

    def payload(self) -> ClientPayload:
        return client_payload(
            code=self.code,
            category=self.category,
            message=self.message,
            retryable=self.retryable,
            retry_after=self.retry_after,
            backoff=self.backoff,
            policy=f"errors/{self.rule}",
        )

    def as_context(self, error: Mapping[str, Any]) -> dict[str, Any]:
        """The ``error`` variable circuit breakers see: the raw fields plus the verdict."""
        return {
            **error,
            "category": self.category.value,
            "severity": self.severity.value,
            "retryable": self.retryable,
            "rule": self.rule,
        }


def error_context(error: BaseException, hook: str) -> dict[str, Any]:
    """The ``error`` variable of the error hook: every declared field, always present."""
    kind = type(error)
    status = 0
    code = ""
    for attribute in _STATUS_ATTRIBUTES:
        value = getattr(error, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and status == 0:
            status = value
        elif isinstance(value, str) and not code:
            code = value
    return {
        "type": kind.__name__,
        "types": [k.__name__ for k in kind.__mro__ if k is not object],
        "module": kind.__module__,
        "message": str(error)[:MAX_MESSAGE_CHARS],
        "status": status,
        "code": code,
        "hook": hook,
    }


def classify(
    policy: PolicySet, activation: Mapping[str, Any], recorder: Recorder = NULL_RECORDER
) -> Classification:
    """The first matching rule's classification; ``activation`` holds the hook's context."""
    # An error rule that cannot be evaluated does not apply: the next rule classifies.
    failure = policy.defaults.on_eval_error or EvalFailureMode.FAIL_OPEN
    for rule in policy.errors:
        hit = matches(rule.when, activation, failure)
        recorder.note("errors", rule.name, hit, rule.code if hit else "skip")
        if hit:
            return Classification(
                rule=rule.name,
                category=rule.category,
                severity=rule.severity,
                code=rule.code,
                message=rule.message,
                retryable=rule.retryable,
                backoff=policy.backoff.get(rule.backoff),
                retry_after=rule.retry_after,
                alert=rule.alert,
            )
    if "ConnectionRefusedError" in activation["error"]["types"]:
        # The application refused the handshake on purpose: a refusal, not a server fault.
        return _built_in("refused", CONNECTION_REFUSED, ErrorSeverity.INFO, None)
    return _built_in("default", INTERNAL, ErrorSeverity.ERROR, backoff_for(policy))


def _built_in(
    rule: str, notice: Notice, severity: ErrorSeverity, backoff: BackoffSpec | None
) -> Classification:
    """The classification no rule of the policy gave: worded by the engine's own notice."""
    return Classification(
        rule=rule,
        category=notice.category,
        severity=severity,
        code=notice.code,
        message=notice.message,
        retryable=notice.retryable,
        backoff=backoff,
        retry_after=None,
        alert=False,
    )
