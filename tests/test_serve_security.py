"""What `serve` itself must not give away: a second trust decision on addresses, tokens in logs."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from prometheus_client import CollectorRegistry

from policy_engine.core.admission import ADVICE_EVENT, ADVICE_NAMESPACE
from policy_engine.observe.logs import configure_logging, redact_query
from policy_engine.server.app import PolicyServer, build_app, serve
from policy_engine.server.demo import create_server
from tests.test_serve import free_port, wait_until

ONE_PER_IP = """\
version: 1
identity:
  trusted_proxies: []
connections:
  max_per_ip: 1
"""


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[PolicyServer, str]]:
    path = tmp_path / "policies.yaml"
    path.write_text(ONE_PER_IP, encoding="utf-8")
    server = build_app(create_server(), path, registry=CollectorRegistry(), sample_interval=0.05)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    task = asyncio.create_task(serve(server, "127.0.0.1", port, install_signals=False))

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await wait_until(ready, "readiness")
        yield server, base
    finally:
        server.shutdown()
        await asyncio.wait_for(task, 15)


async def connect(base: str, forwarded_for: str, **query: str) -> tuple[socketio.AsyncClient, Any]:
    """A websocket client claiming to be forwarded for ``forwarded_for``; (client, refusal)."""
    client = socketio.AsyncClient(reconnection=False)
    refusals: asyncio.Queue[Any] = asyncio.Queue()
    client.on("connect_error", refusals.put)
    # A ceiling ends the session after its advice on the advice namespace.
    client.on(
        ADVICE_EVENT,
        lambda advice: refusals.put_nowait({"message": advice["message"], "data": advice}),
        namespace=ADVICE_NAMESPACE,
    )
    params = "&".join(f"{k}={v}" for k, v in {"conversation_id": "c1", **query}.items())
    try:
        await client.connect(
            f"{base}?{params}",
            headers={"X-Forwarded-For": forwarded_for},
            transports=["websocket"],
            namespaces=["/"],
            wait_timeout=5,
        )
    except socketio.exceptions.ConnectionError:
        return client, await asyncio.wait_for(refusals.get(), 5)
    return client, None


async def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    live: tuple[PolicyServer, str],
) -> None:
    _, base = live
    first, refused_first = await connect(base, "203.0.113.1")
    second, refused_second = await connect(base, "203.0.113.2")
    try:
        assert refused_first is None
        # Without proxy_headers off, uvicorn would have made this a different client.
        assert refused_second is not None
        assert refused_second["data"]["code"] == "TOO_MANY_CONNECTIONS"
    finally:
        await first.disconnect()
        await second.disconnect()


@pytest.mark.usefixtures("restore_logging")
async def test_a_query_token_never_reaches_the_log(live: tuple[PolicyServer, str]) -> None:
    _, base = live
    stream = io.StringIO()
    configure_logging("json", level="debug", stream=stream)
    client, refusal = await connect(base, "198.51.100.9", token="hunter2-secret-token")
    assert refusal is None
    await client.disconnect()
    await asyncio.sleep(0.1)
    log = stream.getvalue()
    assert "WebSocket /socket.io/" in log  # the web server did log the request line
    assert "token=***" in log
    assert "hunter2-secret-token" not in log


def test_redaction_keeps_engineio_parameters_and_masks_the_rest() -> None:
    line = '127.0.0.1:5 - "WebSocket /socket.io/?EIO=4&transport=websocket&token=abc&x=1" 101'
    assert redact_query(line) == (
        '127.0.0.1:5 - "WebSocket /socket.io/?EIO=4&transport=websocket&token=***&x=***" 101'
    )
    assert redact_query("no query here") == "no query here"


ENV_KEYED = """\
version: 1
authentication:
  providers:
    partner:
      algorithms: [HS256]
      keys: {{env: {variable}}}
      from: [{{auth: token}}]
  default: {{providers: [partner], require: required}}
"""


async def test_a_reload_whose_keys_cannot_be_read_keeps_the_running_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTNER_SECRET", "s" * 32)
    path = tmp_path / "policies.yaml"
    path.write_text(ENV_KEYED.format(variable="PARTNER_SECRET"), encoding="utf-8")
    server = build_app(create_server(), path, registry=CollectorRegistry())
    running = server.engine.policy.version

    path.write_text(ENV_KEYED.format(variable="UNSET_PARTNER_SECRET"), encoding="utf-8")
    assert await server.reloader.reload_async() is False
    assert server.engine.policy.version == running
    (failure,) = server.reloader.last_failure
    assert "UNSET_PARTNER_SECRET is not set" in failure.message


@pytest.mark.usefixtures("restore_logging")
def test_serve_refuses_to_start_when_the_keys_cannot_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from policy_engine.cli.main import main

    path = tmp_path / "policies.yaml"
    path.write_text(ENV_KEYED.format(variable="UNSET_PARTNER_SECRET"), encoding="utf-8")
    assert main(["serve", "--policies", str(path), "--port", "1"]) == 1
    assert "UNSET_PARTNER_SECRET is not set" in capsys.readouterr().err
