"""The live status page, ``/dashboard``, as a person sees it in a real browser.

A real server (:mod:`observed`) takes real traffic that opens a breaker, refuses a key and
a reload; headless Chromium, driven by selenium through Debian's ``chromedriver``, opens the
page and the tests read what it shows, then change the server and watch the page follow.
A screenshot is saved in the test's temporary directory (and, with
``POLICY_ENGINE_SCREENSHOT=path``, copied there: ``docs/status-page.png`` is made so).

Without ``chromium`` and ``chromedriver`` on ``PATH`` the browser tests are skipped, unless
``POLICY_ENGINE_REQUIRE_BROWSER=1`` (as CI sets it), which makes them fail instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from observed import CONVERSATION, Observed, drive, start_observed
from redis_server import RedisServer
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait
from servers import WAIT, Clients
from tools import required_tool

from policy_engine.state.redis_store import RedisStore

TOKEN = "operator-secret"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = "chromium and chromedriver are not on PATH (Debian: chromium chromium-driver)"
    chromium = required_tool("chromium", "BROWSER", missing)
    driver = required_tool("chromedriver", "BROWSER", missing)
    options = Options()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


@pytest.fixture
async def observed(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Observed]:
    served = start_observed(tmp_path, RedisStore(redis_server.url, prefix=tmp_path.name))
    yield served
    served.stop()


def text(browser: WebDriver, element_id: str) -> str:
    """What the element shows, read in one step: the page redraws parts of itself on every
    poll, so an element found first and read after may be gone by then."""
    shown: str = browser.execute_script(
        "return document.getElementById(arguments[0]).innerText.trim()", element_id
    )
    return shown


def until(browser: WebDriver, condition: Callable[[WebDriver], Any]) -> None:
    """Wait, at most the suite's generous ceiling, for what the page shows to hold."""
    WebDriverWait(browser, WAIT).until(condition)


def shows(element_id: str, expected: str) -> Callable[[WebDriver], bool]:
    return lambda browser: expected in text(browser, element_id)


def sparkline_points(browser: WebDriver, element_id: str) -> int:
    points: str = browser.execute_script(
        "const line = document.querySelector(`#${arguments[0]} polyline`);"
        "return line ? line.getAttribute('points') : '';",
        element_id,
    )
    return len(points.split())


async def status_of(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/status") as response:
        body: dict[str, Any] = await response.json()
        return body


async def test_the_page_shows_the_server_as_it_is_and_follows_it(
    browser: WebDriver, observed: Observed, tmp_path: Path
) -> None:
    clients = Clients()
    try:
        client = await drive(observed, clients)
        status = await status_of(observed.url)
        browser.get(f"{observed.url}/dashboard?interval=200")

        # The policy in force, and the refused reload with its diagnostics.
        until(browser, shows("policy-version", status["policy"]["version"][:12]))
        assert text(browser, "ready") == "ready"
        assert text(browser, "reload-counts") == "1 succeeded, 1 refused"
        assert browser.find_element(By.ID, "last-failure").is_displayed()
        failure = text(browser, "last-failure")
        assert failure.startswith("Last refused reload")
        assert "invalid rate '2/fortnight'" in failure
        assert "observed.yaml:20:12" in failure

        # The breaker the failing calls opened, connections, the store, the refused key.
        assert text(browser, "breakers") == "storage\topen"
        assert text(browser, "connections") == "1"
        assert text(browser, "store").startswith("up RedisStore, 0 failed calls")
        keys = text(browser, "limited-keys").splitlines()
        assert keys[1:] == [f"rate_limits/pings\t{client.get_sid()}\t1"]

        # The load signals as sparklines, drawn from the samples the page has polled.
        signals = ("loop_lag_ms", "loop_lag_avg_ms", "events_per_second", "active_connections")
        for signal in signals:
            until(browser, lambda b, s=signal: sparkline_points(b, f"spark-{s}") >= 20)
        assert text(browser, "value-active_connections") == "1"
        assert text(browser, "overload") == "not overloaded"  # the policy's load.overloaded
        assert not browser.find_element(By.ID, "error").is_displayed()
        save_screenshot(browser, tmp_path)

        # The page follows the server: a second client, then a reload that succeeds.
        await clients.connect(observed.url, query=CONVERSATION)
        until(browser, shows("connections", "2"))
        assert await observed.live.run(observed.server.reloader.reload_async())
        until(browser, shows("reload-counts", "2 succeeded, 1 refused"))
        assert not browser.find_element(By.ID, "last-failure").is_displayed()
        history = text(browser, "reload-history").splitlines()
        assert history[0].endswith("reloaded: " + status["policy"]["version"][:12])
    finally:
        await clients.close()

    # A server that stops answering is said to, and the last answer stays on the page.
    observed.stop()
    until(browser, lambda b: b.find_element(By.ID, "error").is_displayed())
    assert text(browser, "error").startswith("Cannot reach /status")
    assert text(browser, "breakers") == "storage\topen"


def save_screenshot(browser: WebDriver, tmp_path: Path) -> None:
    path = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a drawn page, not a blank one
    copy_to = os.environ.get("POLICY_ENGINE_SCREENSHOT")
    if copy_to:
        shutil.copyfile(path, copy_to)


async def test_the_page_is_an_operations_endpoint_behind_the_token(tmp_path: Path) -> None:
    served = start_observed(tmp_path, ops_token=TOKEN)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{served.url}/dashboard") as anonymous:
                assert anonymous.status != 200
                assert "policy-engine status" not in await anonymous.text()
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"{served.url}/dashboard", headers=headers) as operator:
                assert operator.status == 200
                assert operator.headers["content-type"] == "text/html; charset=utf-8"
                page = await operator.text()
    finally:
        served.stop()
    assert "<title>policy-engine status</title>" in page
    # Self-contained: nothing is loaded from anywhere else.
    assert "src=" not in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
