"""One Socket.IO connection as the policy sees it: the record both halves of the adapter share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ConnectionState:
    """One Socket.IO connection (a sid in a namespace) as the policy sees it.

    ``conn`` is the context its rules read (built once, at connect); ``close_event`` and
    ``close_reason`` say why the policy closed it, for the disconnect's report;
    ``disconnect_heard`` that the application's disconnect handler was called for it.
    """

    sid: str
    namespace: str
    eio_sid: str
    conn: dict[str, Any]
    claims: Mapping[str, Any]
    connected_at: float
    last_activity: float
    close_event: str = ""
    close_reason: str = ""
    disconnect_heard: bool = False
