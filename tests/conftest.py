from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
import structlog
from engineio.async_socket import AsyncSocket
from hypothesis import settings
from redis_server import RedisServer
from servers import Clients, Served, policy_path, start_server

# Property tests check behaviour, not speed: no per-example deadline (a loaded CI machine
# must not turn a slow example into a failure), and in CI a fixed seed so a run repeats.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# -- live Socket.IO servers and clients (tests/servers.py) -------------------------------------

StartServer = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[StartServer]:
    """Start a real server: ``serve(policy_text=None, setup=..., setup_after=..., **options)``.

    Without ``policy_text`` the shipped policy applies. Every server started is stopped at
    the end of the test.
    """
    started: list[Served] = []

    def start(policy_text: str | None = None, **kwargs: Any) -> Served:
        served = start_server(policy_path(tmp_path, policy_text), **kwargs)
        started.append(served)
        return served

    yield start
    for served in started:
        served.live.stop()


@pytest.fixture
async def clients(serve: StartServer) -> AsyncIterator[Clients]:
    """Real ``socketio.AsyncClient`` connections, closed before the servers stop."""
    opened = Clients()
    yield opened
    await opened.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for a test module; its tests keep apart by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of one test alone (a free loopback port), which may stop, pause and
    restart it; skipped without redis-server unless POLICY_ENGINE_REQUIRE_REDIS=1."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that configure logging (the serve command does): put it all back after."""
    loggers = [
        logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    ]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    structlog.reset_defaults()
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers, logger.level, logger.propagate = handlers, level, propagate


@pytest.fixture
def admin_ui() -> Iterator[Callable[[socketio.AsyncServer], None]]:
    """``admin_ui(sio)`` instruments a server for the admin UI, for this test alone.

    ``instrument()`` patches Engine.IO's socket class for the whole process (a second one
    would recurse): what it replaced is put back after the test.
    """
    patched = ("handle_post_request", "_websocket_handler", "_send_ping")
    saved = {name: AsyncSocket.__dict__[name] for name in patched}
    yield lambda sio: sio.instrument(auth=False)
    for name, original in saved.items():
        setattr(AsyncSocket, name, original)
