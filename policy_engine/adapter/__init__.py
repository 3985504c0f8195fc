"""The only code that touches python-socketio and python-engineio internals.

:func:`attach` installs a policy on an existing ``socketio.AsyncServer``.
"""

from policy_engine.adapter.attach import PolicyAdapter, attach

__all__ = ["PolicyAdapter", "attach"]
