"""Which client manager ``serve`` gives a server, and what it says when it cannot.

These build what ``policy-engine serve`` would run (``server_for``) without starting it: a
Redis store is only named, never reached. tests/test_deploy.py runs the same wiring across
real processes.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from structlog.testing import capture_logs

from policy_engine.cli.main import EXIT_USAGE, build_parser, server_for
from policy_engine.server.app import PolicyServer, open_store
from policy_engine.server.relay import channel, redis_manager, warn_if_emits_stay_local

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"
STORE = "redis://:s3cret@127.0.0.1:1/3"  # nothing listens there, and nothing connects

USER_APP = """\
import socketio

plain = socketio.AsyncServer(async_mode="asgi")
plain_too = socketio.AsyncServer(async_mode="asgi")
relayed = socketio.AsyncServer(
    async_mode="asgi", client_manager=socketio.AsyncRedisManager("redis://127.0.0.1:1/3")
)
"""


def built(*argv: str) -> PolicyServer:
    server = server_for(build_parser().parse_args(["serve", "--policies", str(SHIPPED), *argv]))
    assert isinstance(server, PolicyServer), server
    return server


@pytest.fixture
def user_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of the user's own servers (each takes one policy), fresh for each test."""
    name = f"user_servers_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(USER_APP, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def warnings_of(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "server.emits_local"]


def test_on_redis_the_demo_app_relays_its_emits_on_the_stores_channel() -> None:
    manager = built("--store", STORE).sio.manager

    assert isinstance(manager, socketio.AsyncRedisManager)
    assert manager.redis_url == STORE
    assert manager.channel == "policy-engine:socketio:3"
    assert manager.write_only is False  # it listens: emits of the other processes arrive


def test_without_the_redis_manager_or_on_memory_emits_stay_in_the_process() -> None:
    assert type(built("--store", STORE, "--no-redis-manager").sio.manager) is socketio.AsyncManager
    assert type(built("--store", "memory").sio.manager) is socketio.AsyncManager


def test_the_channel_is_the_deployments_own_per_database() -> None:
    # Redis delivers a message to the channel's subscribers in every database.
    assert channel("policy-engine", "redis://127.0.0.1:6379/0") == "policy-engine:socketio:0"
    assert channel("policy-engine", "redis://127.0.0.1:6379/2") == "policy-engine:socketio:2"
    assert channel("other", "unix:///run/redis.sock?db=5") == "other:socketio:5"
    assert channel("policy-engine", "rediss://cache.example") == "policy-engine:socketio:0"
    assert redis_manager(None) is None
    assert redis_manager(open_store("memory")) is None


def test_a_users_server_with_the_in_process_manager_is_kept_and_warned_about(
    user_app: str,
) -> None:
    with capture_logs() as logs:
        server = built(f"{user_app}:plain", "--store", STORE)

    assert type(server.sio.manager) is socketio.AsyncManager  # not replaced behind its back
    (warning,) = warnings_of(logs)
    assert warning["log_level"] == "warning"
    assert (
        "client_manager=socketio.AsyncRedisManager('redis://:***@127.0.0.1:1/3')"
        in (warning["fix"])
    )
    assert "--no-redis-manager" in warning["fix"]
    assert "s3cret" not in str(warning)


def test_no_warning_for_a_relaying_server_for_memory_or_when_asked_not_to(user_app: str) -> None:
    with capture_logs() as logs:
        relayed = built(f"{user_app}:relayed", "--store", STORE)
        built(f"{user_app}:plain", "--store", "memory")
        built(f"{user_app}:plain_too", "--store", STORE, "--no-redis-manager")

    assert isinstance(relayed.sio.manager, socketio.AsyncRedisManager)
    assert warnings_of(logs) == []


def test_warning_is_the_same_for_a_server_built_in_code() -> None:
    sio = socketio.AsyncServer(async_mode="asgi")
    with capture_logs() as logs:
        assert warn_if_emits_stay_local(sio, open_store("redis://127.0.0.1:1/0")) is True
        assert warn_if_emits_stay_local(sio, None) is False

    (warning,) = warnings_of(logs)
    assert "'redis://127.0.0.1:1/0'" in warning["fix"]


def test_a_bad_store_url_is_still_a_usage_error() -> None:
    args = build_parser().parse_args(["serve", "--policies", str(SHIPPED), "--store", "nope"])
    assert server_for(args) == EXIT_USAGE
