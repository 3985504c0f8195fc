"""The live canary: a candidate policy judged in shadow on real traffic.

A real server (``build_app(..., candidate=...)``, what ``serve --candidate`` builds) and
real clients: every client is served by the enforced policy, while what the candidate
would have decided differently shows in ``/metrics``, ``/status`` and the log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from selenium.webdriver.chrome.webdriver import WebDriver
from servers import WAIT, Clients, LiveServer, eventually
from structlog.testing import capture_logs
from test_status_page import browser, shows, text, until  # noqa: F401 (browser: a fixture, asked for by name)

from policy_engine.server.app import PolicyServer, build_app

ENFORCED = """\
version: 1
rate_limits:
  - name: echo-limit
    hook: event
    when: event.name == "echo"
    key: conn.sid
    limit: 1000/minute
    burst: 1000
"""
CANDIDATE = """\
version: 1
rate_limits:
  - name: echo-limit
    hook: event
    when: event.name == "echo"
    key: conn.sid
    limit: 1000/minute
    burst: 1000
authorization:
  default: allow
  rules:
    - name: no-echo
      hook: event
      when: event.name == "echo"
      effect: deny
      code: ECHO_RETIRED
"""
SERIES = (
    'policy_engine_candidate_disagreements_total{from="allow",rule="authorization/no-echo",'
    'to="ECHO_RETIRED"}'
)


async def metric(url: str, series: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def status(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/status") as response:
        return await response.json()


@pytest.fixture
def served(tmp_path: Path) -> Any:
    enforced, candidate = tmp_path / "enforced.yaml", tmp_path / "candidate.yaml"
    enforced.write_text(ENFORCED, encoding="utf-8")
    candidate.write_text(CANDIDATE, encoding="utf-8")
    sio = socketio.AsyncServer(async_mode="asgi")

    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data

    server = build_app(
        sio, enforced, candidate=candidate, public_operations=True, sample_interval=0.05
    )
    live = LiveServer(server)
    live.start()
    yield server, live, candidate
    live.stop()


async def test_a_candidate_that_denies_shows_in_metrics_and_status_while_clients_are_served(
    served: tuple[PolicyServer, LiveServer, Path],
) -> None:
    server, live, candidate = served
    clients = Clients()
    with capture_logs() as logs:
        await drive(server, live, candidate, clients, logs)


async def drive(
    server: PolicyServer,
    live: LiveServer,
    candidate: Path,
    clients: Clients,
    logs: list[dict[str, Any]],
) -> None:
    try:
        client, _ = await clients.connect(live.url)
        answers = [await client.call("echo", {"n": n}, timeout=WAIT) for n in range(3)]
        assert answers == [{"n": 0}, {"n": 1}, {"n": 2}]  # the enforced policy served them

        async def counted() -> bool:
            return await metric(live.url, SERIES) == 3.0

        await eventually_async(counted)
        report = (await status(live.url))["candidate"]
        assert report["policy"]["source"] == str(candidate)
        assert report["judged"] == 4  # the connect and three events
        assert report["by_kind"] == {
            "allowed_to_refused": 3,
            "refused_to_allowed": 0,
            "code_changed": 0,
        }
        assert report["by_rule"] == [
            {
                "kind": "allowed_to_refused",
                "rule": "authorization/no-echo",
                "from": "allow",
                "to": "ECHO_RETIRED",
                "count": 3,
            }
        ]
        example = report["examples"]["allowed_to_refused"][0]
        assert example["event"] == "echo"
        assert example["sid"] == client.get_sid()
        logged = [entry for entry in logs if entry["event"] == "candidate.disagreed"]
        assert [entry["sid"] for entry in logged] == [client.get_sid()] * 3
        assert {(entry["event_name"], entry["to"]) for entry in logged} == {
            ("echo", "ECHO_RETIRED")
        }

        # Reloaded (as SIGHUP does) to agree: a new comparison starts and nothing differs.
        candidate.write_text(ENFORCED, encoding="utf-8")
        assert await live.run(server.canary.reloader.reload_async())  # type: ignore[union-attr]
        assert await client.call("echo", {"n": 3}, timeout=WAIT) == {"n": 3}
        await eventually(lambda: server.canary.changes.judged == 1)  # type: ignore[union-attr]
        report = (await status(live.url))["candidate"]
        assert report["changed"] == 0
        assert report["reloads"]["succeeded"] == 1
        assert await metric(live.url, SERIES) == 3.0
    finally:
        await clients.close()


async def test_without_a_candidate_status_says_none_and_no_series_is_exported(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "enforced.yaml"
    policy.write_text(ENFORCED, encoding="utf-8")
    server = build_app(socketio.AsyncServer(async_mode="asgi"), policy, public_operations=True)
    live = LiveServer(server)
    live.start()
    try:
        assert (await status(live.url))["candidate"] is None
        assert server.engine.tap is None  # no decision log, no canary: nothing on the path
        async with aiohttp.ClientSession() as http, http.get(f"{live.url}/metrics") as response:
            assert "policy_engine_candidate_" not in await response.text()
    finally:
        live.stop()


async def eventually_async(check: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not await check():
            await asyncio.sleep(0.02)


async def test_the_status_page_shows_the_candidate_and_its_disagreements(
    served: tuple[PolicyServer, LiveServer, Path], request: pytest.FixtureRequest
) -> None:
    chrome: WebDriver = request.getfixturevalue("browser")
    _, live, _ = served
    clients = Clients()
    try:
        client, _ = await clients.connect(live.url)
        for n in range(2):
            assert await client.call("echo", {"n": n}, timeout=WAIT) == {"n": n}
        chrome.get(f"{live.url}/dashboard?interval=200")
        until(chrome, shows("candidate-counts", "2 of 3 decisions would differ"))
        assert "2 allowed → refused" in text(chrome, "candidate-counts")
        rules = text(chrome, "candidate-rules")
        assert "authorization/no-echo" in rules
        assert "allow → ECHO_RETIRED" in rules
    finally:
        await clients.close()
