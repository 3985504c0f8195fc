"""A stopping server lets its clients go: each told why and when to come back, then its
transport closed, at the policy's pace and within its deadline; plain socket.io-client
comes back on its own."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from cluster import ServeProcess, answers
from servers import WAIT, Served, echo_app, eventually

from policy_engine.adapter.drain import DrainReport
from policy_engine.compiler.pipeline import compile_text

JS_DIR = Path(__file__).resolve().parent / "js"
NODE = shutil.which("node")

POLICY = """
version: 1
drain:
  deadline: {deadline}
  close_rate: {rate}
  jitter: 1500ms
  reconnect_url: https://other.example/socket.io
"""


def policy(deadline: str = "10s", rate: str = "20/s") -> str:
    return POLICY.format(deadline=deadline, rate=rate)


async def drain_for(served: Served, seconds: float) -> DrainReport:
    async def drain() -> DrainReport:
        return await served.adapter.drain(asyncio.get_running_loop().time() + seconds)

    return await served.run(drain())


async def connected_clients(served: Served, count: int) -> list[tuple[Any, list[Any], list[str]]]:
    """``count`` python-socketio clients with what they were told and why they left."""
    clients = []
    for _ in range(count):
        sio = socketio.AsyncClient(reconnection=False)
        notices: list[Any] = []
        left: list[str] = []
        sio.on("policy_error", notices.append)
        sio.on("disconnect", lambda reason="", left=left: left.append(str(reason)))
        await sio.connect(served.url, transports=["websocket"], wait_timeout=WAIT)
        clients.append((sio, notices, left))
    return clients


async def test_every_client_is_told_to_come_back_then_let_go(serve: Any) -> None:
    served = serve(policy(), setup=echo_app)
    clients = await connected_clients(served, 12)

    report = await drain_for(served, 10.0)

    await eventually(lambda: all(left for _, _, left in clients))
    assert (report.sessions, report.paced, report.at_deadline) == (12, 12, 0)
    for sio, notices, left in clients:
        (notice,) = notices
        assert notice["code"] == "SERVER_DRAINING"
        assert notice["retryable"] is True
        assert 0 <= notice["retry_after_ms"] <= 1500
        assert notice["reconnect_url"] == "https://other.example/socket.io"
        assert notice["policy"] == "drain"
        assert len(left) == 1
        await sio.disconnect()
    delays = {notice["retry_after_ms"] for _, (notice,), _ in clients}
    assert len(delays) > 1  # each its own delay: a batch does not come back as one
    assert served.adapter.active_connections() == 0


async def test_a_pace_that_would_miss_the_deadline_speeds_up_to_make_it(serve: Any) -> None:
    served = serve(policy(deadline="3500ms", rate="1/s"), setup=echo_app)
    clients = await connected_clients(served, 8)

    report = await drain_for(served, 3.5)

    await eventually(lambda: all(left for _, _, left in clients))
    # At 1/s, 8 clients need 8 s; 1 s is left before the closing margin: all go in it.
    assert report.sessions == 8
    assert report.paced + report.at_deadline == 8
    assert served.adapter.active_connections() == 0
    for sio, _, _ in clients:
        await sio.disconnect()


def test_grace_must_leave_time_before_the_deadline(tmp_path: Path) -> None:
    from policy_engine.errors import PolicyError

    text = "version: 1\ndrain:\n  deadline: 5s\n  grace: 5s\n"
    with pytest.raises(PolicyError) as raised:
        compile_text(text)
    assert "drain-grace" in str(raised.value)
    assert ":4:" in str(raised.value)  # file:line:col of grace


@pytest.mark.skipif(
    NODE is None or not (JS_DIR / "node_modules" / "socket.io-client").is_dir(),
    reason="node and tests/js/node_modules are needed",
)
async def test_a_plain_socketio_client_reads_the_notice_and_reconnects_by_itself(
    serve: Any,
) -> None:
    served = serve(policy(), setup=echo_app)
    assert NODE is not None
    node = await asyncio.create_subprocess_exec(
        NODE,
        str(JS_DIR / "drain.mjs"),
        served.url,
        "4000",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await eventually(lambda: served.adapter.active_connections() == 1)
    await drain_for(served, 10.0)
    served.adapter.draining = False  # a new server in its place: it takes clients again
    stdout, stderr = await asyncio.wait_for(node.communicate(), WAIT)
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    events = [line["event"] for line in lines]

    assert lines[-1]["event"] == "done", (lines, stderr)
    notice = next(line["payload"] for line in lines if line["event"] == "notice")
    assert notice["code"] == "SERVER_DRAINING"
    assert {"reason": "transport close"}.items() <= lines[events.index("disconnected")].items()
    # socket.io-client came back on its own: reconnecting, then connected again.
    after = events[events.index("disconnected") :]
    assert "reconnecting" in after
    assert after.count("connected") >= 1


SERVE_POLICY = """\
version: 1
drain:
  deadline: 8s
  grace: 500ms
  close_rate: 50/s
  jitter: 1s
"""


async def test_sigterm_fails_readiness_first_tells_every_client_and_exits_in_time(
    tmp_path: Path,
) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(SERVE_POLICY, encoding="utf-8")
    process = ServeProcess("drained", tmp_path, policies, "memory")
    process.start()
    try:
        process.wait_until_ready()
        clients = []
        for n in range(20):
            sio = socketio.AsyncClient(reconnection=False)
            notices: list[Any] = []
            sio.on("policy_error", notices.append)
            url = f"{process.url}?conversation_id=c{n}"
            await sio.connect(url, transports=["websocket"], wait_timeout=WAIT)
            clients.append((sio, notices))
        assert process.popen is not None
        process.popen.send_signal(signal.SIGTERM)
        await eventually(lambda: answers(f"{process.url}/readyz") == 503)
        still_served = all(sio.connected for sio, _ in clients)  # within the grace
        exit_code = await asyncio.get_running_loop().run_in_executor(None, process.popen.wait, WAIT)
    finally:
        process.stop()

    assert still_served
    assert exit_code == 0
    assert all(not sio.connected for sio, _ in clients)
    assert [notices[0]["code"] for _, notices in clients] == ["SERVER_DRAINING"] * 20


async def test_a_draining_server_refuses_new_sessions_with_its_advice(serve: Any) -> None:
    served = serve(policy(), setup=echo_app)
    await drain_for(served, 5.0)  # nobody connected: done at once, and still draining

    async with aiohttp.ClientSession() as http:
        url = f"{served.url}/socket.io/?EIO=4&transport=polling"
        async with http.get(url) as response:
            status, retry_after = response.status, response.headers.get("Retry-After")
            body = await response.json()
    async with aiohttp.ClientSession() as http:  # closed here: the refused client won't
        sio = socketio.AsyncClient(reconnection=False, http_session=http)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await sio.connect(served.url, transports=["websocket"], wait_timeout=WAIT)

    assert status == 503
    assert retry_after is not None
    assert 0 <= int(retry_after) <= 2  # jitter 1.5 s, rounded up
    assert body["code"] == "SERVER_DRAINING"
    assert body["reconnect_url"] == "https://other.example/socket.io"
    assert served.adapter.active_connections() == 0


@pytest.mark.skipif(
    NODE is None or not (JS_DIR / "node_modules" / "socket.io-client").is_dir(),
    reason="node and tests/js/node_modules are needed",
)
async def test_the_js_helper_waits_the_advice_and_reconnects_where_the_notice_says(
    serve: Any,
) -> None:
    other = serve("version: 1\n", setup=echo_app)
    draining = serve(
        f"version: 1\ndrain: {{jitter: 300ms, reconnect_url: '{other.url}'}}\n", setup=echo_app
    )
    assert NODE is not None
    node = await asyncio.create_subprocess_exec(
        NODE,
        str(JS_DIR / "drain.mjs"),
        draining.url,
        "4000",
        "helper",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await eventually(lambda: draining.adapter.active_connections() == 1)
    await drain_for(draining, 10.0)
    await eventually(lambda: other.adapter.active_connections() == 1)
    stdout, stderr = await asyncio.wait_for(node.communicate(), WAIT)
    lines = [json.loads(line) for line in stdout.decode().splitlines()]

    assert lines[-1]["event"] == "done", (lines, stderr)
    connected = [line for line in lines if line["event"] == "connected"]
    assert [line["uri"] for line in connected] == [draining.url, other.url]
    notice = next(line for line in lines if line["event"] == "notice")
    assert notice["payload"]["reconnect_url"] == other.url
    # Back after the advised delay, not at once: the helper held its reconnection off.
    waited_ms = connected[1]["t"] - notice["t"]
    assert waited_ms >= notice["payload"]["retry_after_ms"]
