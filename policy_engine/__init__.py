"""policy-engine: declarative reliability policies for python-socketio servers."""

from __future__ import annotations

__version__ = "0.1.0"
