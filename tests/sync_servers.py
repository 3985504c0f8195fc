"""Real sync servers for the tests: python-socketio's ``socketio.Server`` (alone, or as
Flask-SocketIO's) in threading mode, served by werkzeug's threaded WSGI server on a free
loopback port, WebSockets through simple-websocket, as ``SocketIO.run`` serves them.

:func:`start_sync_server` is :func:`servers.start_server` for the sync server: the same
policy, observer and result shape, so one test body can run against either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import socketio
from flask import Flask
from flask_socketio import SocketIO
from servers import RecordingObserver
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from policy_engine.adapter.attach import attach
from policy_engine.adapter.identity import ClaimsLoader
from policy_engine.adapter.sync_server import SyncPolicyAdapter
from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.engine import Engine
from policy_engine.state.memory import StateStore

WAIT = 10.0


class _Quiet(WSGIRequestHandler):
    """No access log: werkzeug logs every request, and a WebSocket closed by its client as
    a bad request once simple-websocket has let go of the socket."""

    def log(self, type: str, message: str, *args: Any) -> None:
        return None


class SyncLiveServer:
    """A WSGI application served by werkzeug, one thread per request, on 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_Quiet
        )
        self.port: int = self.server.server_port
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="live-werkzeug", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(WAIT)
        self.server.server_close()


@dataclass
class SyncServed:
    """One sync application under a policy, served for real."""

    sio: socketio.Server
    engine: Engine
    adapter: SyncPolicyAdapter
    observer: RecordingObserver
    live: SyncLiveServer
    flask: Flask | None = None
    ext: SocketIO | None = None

    @property
    def url(self) -> str:
        return self.live.url

    def stop(self) -> None:
        self.live.stop()
        self.adapter.close()


def start_sync_server(
    policy: Path,
    *,
    setup: Callable[[socketio.Server], None] | None = None,
    flask_setup: Callable[[SocketIO], None] | None = None,
    claims_loader: ClaimsLoader | None = None,
    store: StateStore | None = None,
    gate: bool = False,
    **sio_options: Any,
) -> SyncServed:
    """``setup`` registers handlers on a bare ``socketio.Server``; ``flask_setup`` on a
    Flask-SocketIO ``SocketIO(app)`` instead (its server is the one attached to).
    ``gate``: serve behind the adapter's WSGI overload gate."""
    engine = Engine(compile_file(policy).policy, store)
    observer = RecordingObserver()
    flask_app: Flask | None = None
    ext: SocketIO | None = None
    if flask_setup is not None:
        flask_app = Flask(__name__)
        ext = SocketIO(flask_app, async_mode="threading", **sio_options)
        flask_setup(ext)
        sio = ext.server
        app: Any = flask_app
    else:
        sio = socketio.Server(async_mode="threading", **sio_options)
        if setup is not None:
            setup(sio)
        app = socketio.WSGIApp(sio)
    adapter = attach(sio, engine, observer=observer, claims_loader=claims_loader)
    assert isinstance(adapter, SyncPolicyAdapter)
    if gate and flask_app is not None:
        flask_app.wsgi_app = adapter.wsgi_app(flask_app.wsgi_app)  # type: ignore[method-assign]
    elif gate:
        app = adapter.wsgi_app(app)
    # uvicorn believes X-Forwarded-For from loopback (its proxy_headers default); werkzeug
    # does so behind ProxyFix: the same client address on both servers.
    if flask_app is not None:
        flask_app.wsgi_app = ProxyFix(flask_app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    else:
        app = ProxyFix(app, x_for=1)
    live = SyncLiveServer(app)
    live.start()
    return SyncServed(sio, engine, adapter, observer, live, flask_app, ext)
