"""The only code that touches python-socketio and python-engineio internals.

:func:`attach` installs a policy on an existing ``socketio.AsyncServer`` or
``socketio.Server`` (Flask-SocketIO's).
"""

from policy_engine.adapter.attach import PolicyAdapter, SyncPolicyAdapter, attach

__all__ = ["PolicyAdapter", "SyncPolicyAdapter", "attach"]
