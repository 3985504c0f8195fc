"""The shipped Prometheus rules and Grafana dashboard, checked by promtool and a live server.

``deploy/prometheus/alerts.yaml`` passes its ``promtool test rules`` unit tests, every alert
has a summary and a runbook section that exists in docs/operations.md, every expression of
``deploy/grafana/policy-engine.json`` parses as PromQL, and every metric the rules and the
dashboard name is exported by a real server's ``/metrics`` after real traffic.

Without promtool on ``PATH`` the promtool tests are skipped, unless
``POLICY_ENGINE_REQUIRE_PROMTOOL=1`` (as CI sets it), which makes them fail instead.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from observed import Observed, drive, start_observed
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer
from servers import Clients
from tools import required_tool

from policy_engine.state.redis_store import RedisStore

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "policy-engine.json"
OPERATIONS = ROOT / "docs" / "operations.md"
# Every name the rules and dashboard may use: ours, and the process collector's.
METRIC_NAME = re.compile(r"\b(?:policy_engine|process)_[a-z_]+\b")
# What Grafana substitutes before the query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "15s",
    "$job": ".*",
    "$instance": ".*",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    missing = "promtool is not on PATH (Debian: apt-get install prometheus)"
    return required_tool("promtool", "PROMTOOL", missing)


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation, Grafana's variables substituted."""
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]
    found += [
        (f"annotation {annotation['name']!r}", annotation["expr"])
        for annotation in board["annotations"]["list"]
        if "expr" in annotation
    ]
    return [(where, grafana_substituted(expr)) for where, expr in found]


def grafana_substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_metric_names(board: dict[str, Any]) -> set[str]:
    texts = [expr for _, expr in dashboard_expressions(board)]
    texts += [json.dumps(variable) for variable in board["templating"]["list"]]
    return {name for text in texts for name in METRIC_NAME.findall(text)}


def rules_metric_names() -> set[str]:
    return {name for rule in alert_rules() for name in METRIC_NAME.findall(rule["expr"])}


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# -- the alerting rules ----------------------------------------------------------------------


def test_the_alerting_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in output


def test_the_example_prometheus_configuration_loads_the_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_every_alert_is_shown_firing_by_a_unit_test() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alert_rules()}
    assert names == fired


def test_every_alert_has_a_summary_and_a_runbook_section_in_the_operations_guide() -> None:
    headings = {
        github_anchor(line.lstrip("#"))
        for line in OPERATIONS.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert annotations["summary"], rule["alert"]
        document, _, anchor = annotations["runbook"].partition("#")
        assert document == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in headings, f"{rule['alert']}: no heading #{anchor} in {OPERATIONS.name}"


def test_the_issue_s_alerts_are_all_there() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {
        "PolicyEngineBreakerOpen",
        "PolicyEngineShedding",
        "PolicyEngineStoreDown",
        "PolicyEngineReloadRefused",
        "PolicyEngineErrorRateHigh",
        "PolicyEngineConnectionsNearLimit",
        "PolicyEngineLoopLagHigh",
        "PolicyEngineAlertingError",
    }


# -- the dashboard ---------------------------------------------------------------------------


def test_every_dashboard_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each expression becomes a recording rule, which ``promtool check rules`` parses."""
    expressions = dashboard_expressions(dashboard())
    rules = [
        {"record": f"dashboard:expression_{index}", "expr": expr}
        for index, (_, expr) in enumerate(expressions)
    ]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in output


def test_a_broken_expression_fails_the_promtool_check(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: promtool refuses what Grafana would show as an error."""
    rules = [{"record": "dashboard:broken", "expr": "sum by (rule (rate(x[5m]))"}]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0


def test_the_dashboard_shows_what_operators_watch() -> None:
    board = dashboard()
    titles = {panel["title"] for panel in panels(board)}
    assert {
        "Decisions by outcome",
        "Refusals by rule",
        "Errors by code",
        "Breaker states",
        "Shed",
        "Event-loop lag",
        "Events per second",
        "Connections",
        "Reloads",
        "Shared store",
        "Decision latency histogram",
    } <= titles
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_provisioning_example_points_at_the_dashboard_folder() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "policy-engine.yaml").read_text())
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert [source["type"] for source in sources["datasources"]] == ["prometheus"]


# -- against a live server -------------------------------------------------------------------


@pytest.fixture
async def observed_on_redis(tmp_path: Path, redis_server: RedisServer) -> Iterator[Observed]:
    """The observed server on a shared store, so that the store's health is exported."""
    observed = start_observed(tmp_path, RedisStore(redis_server.url, prefix=tmp_path.name))
    yield observed
    observed.stop()


async def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of ``/metrics``, by sample name, then by labels."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def test_every_metric_the_rules_and_dashboard_name_is_exported(
    observed_on_redis: Observed,
) -> None:
    clients = Clients()
    try:
        await drive(observed_on_redis, clients)
        exported = await scrape(observed_on_redis.url)
    finally:
        await clients.close()
    used = rules_metric_names() | dashboard_metric_names(dashboard())
    assert len(used) > 20  # the extraction found the names, not nothing
    missing = sorted(name for name in used if name not in exported)
    assert not missing, f"named by the rules or dashboard, not exported: {missing}"


async def test_the_series_alerts_watch_are_counted_from_real_traffic(
    observed_on_redis: Observed,
) -> None:
    clients = Clients()
    try:
        before = await scrape(observed_on_redis.url)
        await drive(observed_on_redis, clients)
        after = await scrape(observed_on_redis.url)
    finally:
        await clients.close()
    exhausted = (("category", "system"), ("code", "RESOURCE_EXHAUSTED"))
    failure = (("result", "failure"),)
    # Zeroed from the start, so the first one is an increase an alert sees.
    assert before["policy_engine_alerts_total"][exhausted] == 0
    assert before["policy_engine_policy_reloads_total"][failure] == 0
    assert after["policy_engine_alerts_total"][exhausted] == 2
    assert after["policy_engine_policy_reloads_total"][failure] == 1
    assert after["policy_engine_max_connections"][()] == 100
    assert after["policy_engine_circuit_breaker_state"][(("breaker", "storage"),)] == 2
    assert after["policy_engine_store_up"][()] == 1
    shed = (("action", "disconnect"), ("rule", "shedding/shed-crowd"))
    assert after["policy_engine_shed_total"][shed] == 0
