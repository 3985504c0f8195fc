from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from prometheus_client import CollectorRegistry

from policy_engine.cli.main import main
from policy_engine.server.app import AppImportError, PolicyServer, build_app, load_server, serve
from policy_engine.server.demo import REFUSAL_MESSAGE, create_server

POLICY = """\
version: 1
errors:
  - name: internal
    when: "true"
    category: system
    code: INTERNAL
    retryable: true
rate_limits:
  - name: connect-per-ip
    hook: connect
    key: conn.ip
    limit: {limit}/minute
circuit_breakers:
  - name: agent
    match: event.name == "oh_user_action"
    failure_rate: 50%
    window: {{calls: 10}}
    minimum_calls: 5
    open_for: 10s
"""
# The misspelt field is at line 11, column 14.
BROKEN = POLICY.format(limit=100).replace("key: conn.ip", "key: conn.ipp")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` for up to about 15 s; a bound on waiting, not an assertion on time."""
    for _ in range(300):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICY.format(limit=100), encoding="utf-8")
    return path


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    try:
        async with http.get(url) as response:
            return response.status, await response.text()
    except aiohttp.ClientConnectionError:
        return 0, ""


async def talk(base: str, conversation: str, actions: int = 1) -> list[tuple[Any, Any]]:
    """Connect a python-socketio client, send actions; return each ack with its echo."""
    client = socketio.AsyncClient(reconnection=False)
    echoes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    client.on("oh_event", echoes.put)
    await client.connect(
        f"{base}?conversation_id={conversation}",
        auth={"conversation_id": conversation},
        transports=["websocket"],
        wait_timeout=5,
    )
    exchanges = []
    try:
        for _ in range(actions):
            action = {"action": "message", "text": "hi"}
            ack = await client.call("oh_user_action", action, timeout=5)
            exchanges.append((ack, await asyncio.wait_for(echoes.get(), 5)))
    finally:
        await client.disconnect()
    return exchanges


async def refusal_without_conversation(base: str) -> Any:
    """What ``connect_error`` carries when a client connects without a conversation."""
    client = socketio.AsyncClient(reconnection=False)
    refusals: asyncio.Queue[Any] = asyncio.Queue()
    client.on("connect_error", refusals.put)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(base, transports=["websocket"], wait_timeout=5)
    return await asyncio.wait_for(refusals.get(), 5)


# -- in process ------------------------------------------------------------------------------


class Asgi:
    """Calls an ASGI app directly, as a server would, for one HTTP request."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def request(
        self, path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(dict(message))

        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": headers or [],
            "query_string": b"",
        }
        await self.app(scope, receive, send)
        start, body = sent[0], sent[1]
        headers = {k.decode(): v.decode() for k, v in start["headers"]}
        return start["status"], headers, body["body"]


@pytest.fixture
def server(policy_file: Path) -> PolicyServer:
    return build_app(
        create_server(), policy_file, registry=CollectorRegistry(), sample_interval=0.05
    )


async def test_readiness_follows_the_lifecycle_and_health_is_always_ok(
    server: PolicyServer,
) -> None:
    asgi = Asgi(server)
    status, _, body = await asgi.request("/readyz")
    assert status == 503
    assert "not started" in json.loads(body)["reasons"]
    assert (await asgi.request("/healthz"))[0] == 200

    await server.start()
    try:
        status, headers, body = await asgi.request("/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True, "reasons": []})
        assert headers["content-type"] == "application/json"
    finally:
        await server.stop()

    status, _, body = await asgi.request("/readyz")
    assert status == 503
    assert "shutting down" in json.loads(body)["reasons"]
    assert (await asgi.request("/healthz"))[0] == 200


async def test_status_reports_policy_reloads_breakers_connections_and_load(
    server: PolicyServer, policy_file: Path
) -> None:
    await server.start()
    try:
        policy_file.write_text(BROKEN, encoding="utf-8")
        assert await server.reloader.reload_async() is False
        status, _, body = await Asgi(server.operations_app).request("/status")
    finally:
        await server.stop()

    report = json.loads(body)
    assert status == 200
    assert report["policy"]["version"] == server.engine.policy.version
    assert report["policy"]["source"] == str(policy_file)
    assert report["policy"]["loaded_at"].endswith("+00:00")
    assert report["reloads"]["succeeded"] == 0
    assert report["reloads"]["failed"] == 1
    assert report["reloads"]["last_failure"][0].startswith(f"{policy_file}:11:14: error:")
    assert report["breakers"] == {"agent": "closed"}
    assert report["connections"] == {"active": 0}
    assert set(report["load"]) == {
        "active_connections",
        "loop_lag_ms",
        "events_per_second",
        "memory_mb",
        "cpu_percent",
        "overloaded_ms",
        "connects_per_second",
        "loop_lag_avg_ms",
        "events_per_second_avg",
        "connects_per_second_avg",
        "overloaded",
    }


async def test_metrics_endpoint_serves_prometheus_text(server: PolicyServer) -> None:
    status, headers, body = await Asgi(server.operations_app).request("/metrics")
    text = body.decode()

    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert f'version="{server.engine.policy.version}"' in text
    assert 'policy_engine_circuit_breaker_state{breaker="agent"} 0.0' in text
    assert "process_resident_memory_bytes" in text


async def test_operations_endpoints_only_answer_get_and_head(server: PolicyServer) -> None:
    status, headers, _ = await Asgi(server.operations_app).request("/status", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    status, _, body = await Asgi(server).request("/healthz", method="HEAD")
    assert (status, body) == (200, b"")


async def test_lifespan_starts_and_stops_the_server(server: PolicyServer) -> None:
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: list[str] = []

    async def send(message: Any) -> None:
        outbox.append(message["type"])

    await inbox.put({"type": "lifespan.startup"})
    await inbox.put({"type": "lifespan.shutdown"})
    await server({"type": "lifespan"}, inbox.get, send)

    assert outbox == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not server.sampler.running


async def test_a_socketio_client_talks_through_the_policy_in_process(
    server: PolicyServer, http: aiohttp.ClientSession
) -> None:
    port, ops_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    task = asyncio.create_task(
        serve(server, "127.0.0.1", port, install_signals=False, ops_port=ops_port)
    )
    try:
        await wait_until(lambda: _status_is(http, f"{base}/readyz", 200), "readiness")
        exchanges = await talk(base, "conv-1", actions=2)
        refusal = await refusal_without_conversation(base)
        assert (await get(http, f"{base}/metrics"))[0] == 404
        _, metrics = await get(http, f"http://127.0.0.1:{ops_port}/metrics")
    finally:
        server.shutdown()
        await asyncio.wait_for(task, 15)

    (first_ack, first_echo), (second_ack, second_echo) = exchanges
    assert first_ack["ok"] is second_ack["ok"] is True
    assert first_echo["conversation_id"] == "conv-1"
    assert first_echo["action"] == {"action": "message", "text": "hi"}
    assert isinstance(first_echo["id"], int)
    assert second_echo["id"] > first_echo["id"]
    assert refusal["message"] == REFUSAL_MESSAGE
    assert {"code", "retryable", "correlation_id"} <= set(refusal["data"])
    assert 'policy_engine_decisions_total{hook="connect",outcome="allow",rule="none"}' in metrics
    assert 'policy_engine_decisions_total{hook="event",outcome="allow",rule="none"} 2.0' in metrics


async def _status_is(http: aiohttp.ClientSession, url: str, expected: int) -> bool:
    status, _ = await get(http, url)
    return status == expected


# -- app references and the command line ---------------------------------------------------


def test_load_server_resolves_module_attr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "chat_app.py").write_text(
        "import socketio\n"
        "sio = socketio.AsyncServer(async_mode='asgi')\n"
        "class Holder:\n    server = sio\n"
        "aiohttp_sio = socketio.AsyncServer(async_mode='aiohttp')\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    assert isinstance(load_server("chat_app:sio"), socketio.AsyncServer)
    assert load_server(None) is not load_server(None)  # a fresh demo app each time
    assert load_server(None).async_mode == "asgi"
    assert load_server("chat_app:Holder.server") is load_server("chat_app:sio")
    for reference, message in [
        ("chat_app", "expected MODULE:ATTR"),
        ("no_such_module_here:sio", "cannot import"),
        ("chat_app:missing", "has no attribute"),
        ("chat_app:Holder", "not a socketio.AsyncServer"),
        ("chat_app:aiohttp_sio", "async_mode='asgi'"),
    ]:
        with pytest.raises(AppImportError, match=message):
            load_server(reference)


@pytest.mark.usefixtures("restore_logging")
def test_serve_refuses_an_invalid_policy_with_diagnostics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")

    code = main(["serve", "--policies", str(path), "--port", str(free_port())])

    assert code == 1
    err = capsys.readouterr().err
    assert f"{path}:11:14: error:" in err
    assert "not serving" in err


@pytest.mark.usefixtures("restore_logging")
def test_serve_refuses_a_bad_app_reference(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "no_such_module_here:sio", "--policies", str(policy_file)])

    assert code == 2
    assert "cannot import" in capsys.readouterr().err


def test_validate_never_imports_the_server_stack(policy_file: Path) -> None:
    script = (
        "import sys\n"
        "from policy_engine.cli.main import main\n"
        f"code = main(['validate', {str(policy_file)!r}])\n"
        "heavy = [m for m in ('socketio', 'uvicorn', 'redis', 'prometheus_client') "
        "if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stderr


# -- a real process ------------------------------------------------------------------------


def command() -> list[str]:
    script = Path(sys.executable).with_name("policy-engine")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from policy_engine.cli.main import entry; entry()"]


class Process:
    def __init__(self, popen: subprocess.Popen[bytes], log: Path, base: str, ops: str) -> None:
        self.popen = popen
        self.log = log
        self.base = base
        self.ops = ops

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


@pytest.fixture
def running_server(policy_file: Path, tmp_path: Path) -> Iterator[Process]:
    port, ops_port = free_port(), free_port()
    log = tmp_path / "server.log"
    argv = [
        *command(),
        "serve",
        "--policies",
        str(policy_file),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-format",
        "json",
        "--graceful-timeout",
        "2",
        "--ops-port",
        str(ops_port),
    ]
    with log.open("wb") as output:
        popen = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield Process(popen, log, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ops_port}")
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(timeout=10)


async def test_sighup_reloads_a_real_process_and_keeps_the_old_policy_on_errors(
    running_server: Process, policy_file: Path, http: aiohttp.ClientSession
) -> None:
    base = running_server.base
    pid = running_server.popen.pid

    async def status() -> dict[str, Any]:
        code, body = await get(http, f"{running_server.ops}/status")
        return json.loads(body) if code == 200 else {}

    async def ready() -> bool:
        assert running_server.popen.poll() is None, running_server.log.read_text()
        return await _status_is(http, f"{base}/readyz", 200)

    await wait_until(ready, "the server to be ready")
    assert (await get(http, f"{base}/healthz"))[0] == 200
    first = (await status())["policy"]["version"]

    # A valid change: the new version is served.
    policy_file.write_text(POLICY.format(limit=200), encoding="utf-8")
    os.kill(pid, signal.SIGHUP)

    async def version_changed() -> bool:
        return (await status()).get("policy", {}).get("version") not in (None, first)

    await wait_until(version_changed, "the new policy version")
    second = (await status())["policy"]["version"]

    # An invalid change: logged with file:line:col, counted, the old policy kept.
    policy_file.write_text(BROKEN, encoding="utf-8")
    os.kill(pid, signal.SIGHUP)

    async def failure_logged() -> bool:
        return any(e.get("event") == "policy.reload_failed" for e in running_server.events())

    await wait_until(failure_logged, "the reload failure in the log")
    (failure,) = [e for e in running_server.events() if e.get("event") == "policy.reload_failed"]
    assert failure["level"] == "error"
    assert failure["path"] == str(policy_file)
    assert any(d.startswith(f"{policy_file}:11:14: error:") for d in failure["diagnostics"])

    report = await status()
    assert report["policy"]["version"] == second
    assert report["reloads"] == {
        "succeeded": 1,
        "failed": 1,
        "last_failure": failure["diagnostics"],
    }
    _, metrics = await get(http, f"{running_server.ops}/metrics")
    assert 'policy_engine_policy_reloads_total{result="failure"} 1.0' in metrics
    assert 'policy_engine_policy_reloads_total{result="success"} 1.0' in metrics
    assert f'version="{second}"' in metrics

    # Still serving Socket.IO under the policy that stayed in force.
    ((ack, echo),) = await talk(base, "conv-7")
    assert ack["ok"] is True
    assert echo["conversation_id"] == "conv-7"

    # SIGTERM: a graceful shutdown and a clean exit.
    os.kill(pid, signal.SIGTERM)
    assert await asyncio.to_thread(running_server.popen.wait, 15) == 0
    assert any(e.get("event") == "server.stopping" for e in running_server.events())


async def test_operations_data_is_not_served_to_the_public_without_the_operator_token(
    policy_file: Path,
) -> None:
    guarded = build_app(
        create_server(), policy_file, registry=CollectorRegistry(), ops_token="s3cret-token"
    )
    closed = build_app(create_server(), policy_file, registry=CollectorRegistry())
    public = Asgi(guarded)

    assert (await public.request("/healthz"))[0] == 200
    assert (await public.request("/readyz"))[0] == 503  # not started, but answered
    for path in ("/status", "/metrics"):
        assert (await public.request(path))[0] == 404
        assert (await Asgi(closed).request(path))[0] == 404
        wrong = [(b"authorization", b"Bearer s3cret-tokeN")]
        assert (await public.request(path, headers=wrong))[0] == 404
        right = [(b"authorization", b"Bearer s3cret-token")]
        assert (await public.request(path, headers=right))[0] == 200
        assert (await Asgi(closed.operations_app).request(path))[0] == 200
    assert (await Asgi(closed.operations_app).request("/socket.io/"))[0] == 404


SLOW_LOADER = """\
import pathlib, time

time.sleep(3)  # loading the application's own code takes a while
pathlib.Path({marker!r}).write_text("loaded")


class Claims:
    async def load(self, handshake):
        return {{}}


claims = Claims()
"""


def test_serve_listens_before_it_loads_and_answers_what_waited(
    policy_file: Path, tmp_path: Path
) -> None:
    """A connection made while ``serve`` still loads (here, a claims loader slow to import)
    is accepted by the kernel and answered once the server runs, not refused: a client
    reconnecting during a restart loses no backoff round to the start-up."""
    marker = tmp_path / "loaded"
    (tmp_path / "slow_claims.py").write_text(SLOW_LOADER.format(marker=str(marker)))
    port = free_port()
    argv = [*command(), "serve", "--policies", str(policy_file), "--port", str(port)]
    argv += ["--claims-loader", "slow_claims:claims", "--log-format", "json"]
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        popen = subprocess.Popen(argv, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
    try:
        for _ in range(1000):  # a bound on waiting for the port, not a measure of time
            try:
                early = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                assert popen.poll() is None
                time.sleep(0.01)
        else:
            pytest.fail("serve never listened")
        loaded_when_accepted = marker.exists()
        with early:
            early.settimeout(60)
            early.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := early.recv(4096):
                answer += chunk
    finally:
        popen.terminate()
        popen.wait(timeout=20)

    assert not loaded_when_accepted  # accepted while the application was still loading
    assert answer.startswith(b"HTTP/1.1 200")
    assert marker.exists()
    # uvicorn says where it runs only for sockets it binds itself: serve says so instead.
    assert f'"url": "http://127.0.0.1:{port}"' in log.read_text()


def test_serve_says_at_once_when_its_port_is_taken(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = main(["serve", "--policies", str(policy_file), "--port", str(port)])

    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
