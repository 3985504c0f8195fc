"""Refusals as data: the client code per reason, and what the error hook's context sees."""

from __future__ import annotations

import pytest

from policy_engine.auth import AUTH_EXPIRED, AUTH_FAILED, AuthenticationError, AuthReason
from policy_engine.core.classify import error_context


@pytest.mark.parametrize("reason", list(AuthReason))
def test_only_expiry_is_auth_expired_and_only_missing_keys_retryable(reason: AuthReason) -> None:
    error = AuthenticationError(reason)
    assert error.code == (AUTH_EXPIRED if reason is AuthReason.EXPIRED else AUTH_FAILED)
    assert error.retryable is (reason is AuthReason.KEYS_UNAVAILABLE)


def test_the_detail_is_bounded() -> None:
    error = AuthenticationError(AuthReason.MISSING_CLAIM, "x" * 1000)
    assert len(str(error)) < 160


def test_the_error_hook_sees_the_type_code_and_reason() -> None:
    """The shipped policy's ``auth-failed`` rule matches ``error.type``; a rule placed before
    it can tell expiry apart by ``error.code``."""
    context = error_context(AuthenticationError(AuthReason.EXPIRED), "connect")
    assert context["type"] == "AuthenticationError"
    assert context["code"] == AUTH_EXPIRED
    assert context["message"] == "AUTH_EXPIRED: expired"
