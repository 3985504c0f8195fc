"""policy-engine: declarative reliability policies for python-socketio servers.

The names below are the public API; everything in the subpackages may change. They are
imported on first use, so ``policy-engine validate`` does not pay for the server's
dependencies (python-socketio, uvicorn, prometheus_client) it never touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "attach": "policy_engine.adapter",
    "PolicyAdapter": "policy_engine.adapter",
    "SyncPolicyAdapter": "policy_engine.adapter",
    "Engine": "policy_engine.core.engine",
    "compile_file": "policy_engine.compiler",
    "compile_text": "policy_engine.compiler",
    "CompileResult": "policy_engine.compiler",
    "build_app": "policy_engine.server.app",
    "open_store": "policy_engine.server.app",
    "PolicyServer": "policy_engine.server.app",
    "MemoryStore": "policy_engine.state.memory",
    "connect_with_policy": "policy_engine.client",
    "call_with_policy": "policy_engine.client",
    "connect_with_policy_sync": "policy_engine.client_sync",
    "call_with_policy_sync": "policy_engine.client_sync",
    "ConnectionRefused": "policy_engine.client_retry",
    "EventRefused": "policy_engine.client_retry",
    "PolicyRefusedError": "policy_engine.client_retry",
    "PolicyEngineError": "policy_engine.errors",
    "PolicyError": "policy_engine.errors",
    "EvaluationError": "policy_engine.errors",
    "StoreError": "policy_engine.errors",
}

__all__ = [
    "CompileResult",
    "ConnectionRefused",
    "Engine",
    "EvaluationError",
    "EventRefused",
    "MemoryStore",
    "PolicyAdapter",
    "PolicyEngineError",
    "PolicyError",
    "PolicyRefusedError",
    "PolicyServer",
    "StoreError",
    "SyncPolicyAdapter",
    "__version__",
    "attach",
    "build_app",
    "call_with_policy",
    "call_with_policy_sync",
    "compile_file",
    "compile_text",
    "connect_with_policy",
    "connect_with_policy_sync",
    "open_store",
]

if TYPE_CHECKING:
    from policy_engine.adapter import PolicyAdapter, SyncPolicyAdapter, attach
    from policy_engine.client import call_with_policy, connect_with_policy
    from policy_engine.client_retry import ConnectionRefused, EventRefused, PolicyRefusedError
    from policy_engine.client_sync import call_with_policy_sync, connect_with_policy_sync
    from policy_engine.compiler import CompileResult, compile_file, compile_text
    from policy_engine.core.engine import Engine
    from policy_engine.errors import EvaluationError, PolicyEngineError, PolicyError, StoreError
    from policy_engine.server.app import PolicyServer, build_app, open_store
    from policy_engine.state.memory import MemoryStore


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'policy_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
