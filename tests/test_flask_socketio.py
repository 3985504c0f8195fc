"""The policy on Flask-SocketIO in threading mode: through a real server (werkzeug, real
``socketio.Client`` instances) and through Flask-SocketIO's own test client."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from flask import Flask, request
from flask_socketio import SocketIO, join_room
from servers import CONTRACT_KEYS, WAIT, policy_path
from sync_servers import SyncServed, start_sync_server

from policy_engine.cli.token import mint
from policy_engine.compiler.pipeline import compile_file

_addresses = itertools.count(1)


def fresh_ip() -> dict[str, str]:
    """A client address of its own, so the per-IP connect limit never meets another test's."""
    return {"X-Forwarded-For": f"198.51.100.{next(_addresses) % 250 + 1}"}


def conversation_app(ext: SocketIO) -> None:
    """A Flask-SocketIO conversation app, its handlers unaware of any policy."""

    @ext.on("connect")
    def connect(auth: Any) -> None:
        room = request.args.get("conversation_id", "")
        if room:
            join_room(room)

    @ext.on("oh_user_action")
    def oh_user_action(data: Any) -> Any:
        return {"ok": True}

    @ext.on("echo")
    def echo(data: Any) -> Any:
        return data

    @ext.on("boom")
    def boom(data: Any) -> Any:
        raise RuntimeError("database password is hunter2")


StartFlask = Callable[..., SyncServed]


@pytest.fixture
def flask_served(tmp_path: Path) -> Iterator[StartFlask]:
    """Start Flask-SocketIO apps under a policy (the shipped one by default), for real."""
    started: list[SyncServed] = []

    def start(policy_text: str | None = None, **kwargs: Any) -> SyncServed:
        kwargs.setdefault("flask_setup", conversation_app)
        served = start_sync_server(policy_path(tmp_path, policy_text), **kwargs)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


class SyncClients:
    """Real ``socketio.Client`` connections, each recording what it received."""

    def __init__(self) -> None:
        self.opened: list[socketio.Client] = []

    def new(self) -> tuple[socketio.Client, dict[str, list[Any]]]:
        client = socketio.Client(reconnection=False)
        received: dict[str, list[Any]] = {"connect_error": [], "policy_error": []}
        arrived = threading.Condition()

        def recorder(name: str) -> Callable[..., None]:
            def record(*args: Any) -> None:
                with arrived:
                    received[name].append(args[0] if len(args) == 1 else list(args))
                    arrived.notify_all()

            return record

        for name in received:
            client.on(name, recorder(name))
        self.opened.append(client)
        return client, received

    def connect(
        self, url: str, query: str = "conversation_id=c1", **kwargs: Any
    ) -> tuple[socketio.Client, dict[str, list[Any]]]:
        client, received = self.new()
        kwargs.setdefault("headers", fresh_ip())
        client.connect(f"{url}?{query}", transports=["websocket"], wait_timeout=WAIT, **kwargs)
        return client, received

    def refused(self, url: str, query: str = "conversation_id=c1", **kwargs: Any) -> Any:
        """A connection that must be refused: its ``connect_error`` data."""
        client, received = self.new()
        kwargs.setdefault("headers", fresh_ip())
        with pytest.raises(socketio.exceptions.ConnectionError):
            client.connect(f"{url}?{query}", transports=["websocket"], wait_timeout=WAIT, **kwargs)
        assert received["connect_error"], "refused without a connect_error"
        return received["connect_error"][-1]

    def close(self) -> None:
        """Drop every transport: websocket-client's closing handshake waits 3 s for a close
        frame werkzeug's WebSocket never sends back."""
        for client in self.opened:
            if client.eio.ws is not None:
                client.eio.ws.shutdown()
            client.eio.disconnect(abort=True)


@pytest.fixture
def sync_clients() -> Iterator[SyncClients]:
    opened = SyncClients()
    yield opened
    opened.close()


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (state another thread changes) until it holds; fail after WAIT."""
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("the condition never held")


# -- through a real server -----------------------------------------------------------------------


def test_a_connect_without_a_conversation_is_refused_with_the_client_contract(
    flask_served, sync_clients
):
    served = flask_served()

    error = sync_clients.refused(served.url, query="")

    assert error["message"] == "Connect with a conversation_id."
    payload = error["data"]
    assert set(payload) == CONTRACT_KEYS
    assert payload["code"] == "CONVERSATION_REQUIRED"
    assert payload["policy"] == "authorization/require-conversation"
    assert served.adapter.active_connections() == 0
    assert served.engine.local.connection_counts() == (0, 0, 0)


def test_an_admitted_connect_runs_the_flask_handler_once_and_is_counted(flask_served, sync_clients):
    calls: list[Any] = []

    def app(ext: SocketIO) -> None:
        conversation_app(ext)

        @ext.on("connect")
        def connect(auth: Any) -> None:
            calls.append(request.args.get("conversation_id"))
            join_room(request.args.get("conversation_id", ""))

    served = flask_served(flask_setup=app)
    token = mint("alice")

    client, _ = sync_clients.connect(served.url, auth={"token": token})

    assert calls == ["c1"]
    state = served.adapter.connections()[client.get_sid()]
    assert state.conn["user_id"] == "alice"
    assert state.conn["conversation_id"] == "c1"
    assert state.conn["transport"] == "websocket"
    assert served.engine.local.connection_counts() == (1, 1, 1)
    assert client.call("echo", "hello", timeout=WAIT) == "hello"


ACTION_LIMIT = """
version: 1
defaults: {backoff: brief}
backoff:
  brief: {strategy: constant, base: 10ms, max: 10ms, max_attempts: 3}
rate_limits:
  - name: actions-per-connection
    hook: event
    when: event.name == "oh_user_action"
    key: conn.sid
    limit: 1/minute
    burst: 3
"""


def test_an_action_over_its_rate_limit_is_refused_in_its_ack(flask_served, sync_clients):
    served = flask_served(ACTION_LIMIT)
    client, _ = sync_clients.connect(served.url)

    answers = [client.call("oh_user_action", {"action": "run"}, timeout=WAIT) for _ in range(4)]

    assert answers[:3] == [{"ok": True}] * 3
    limited = answers[3]
    assert set(limited) == CONTRACT_KEYS
    assert limited["code"] == "RATE_LIMITED"
    assert limited["policy"] == "rate_limits/actions-per-connection"
    assert limited["retry_after_ms"] > 0
    assert client.call("echo", "other events pass", timeout=WAIT) == "other events pass"


def test_a_payload_that_breaks_the_event_schema_is_refused(flask_served, sync_clients):
    served = flask_served()
    client, _ = sync_clients.connect(served.url)

    answer = client.call("oh_user_action", {"args": {}}, timeout=WAIT)

    assert answer["code"] == "INVALID_PAYLOAD"
    assert answer["policy"] == "events/oh_user_action"
    assert client.call("oh_user_action", {"action": "run"}, timeout=WAIT) == {"ok": True}


def test_a_viewer_is_denied_actions_by_the_authorization_rules(flask_served, sync_clients):
    served = flask_served()
    client, _ = sync_clients.connect(served.url, auth={"token": mint("bob", {"role": "viewer"})})

    answer = client.call("oh_user_action", {"action": "run"}, timeout=WAIT)

    assert answer["code"] == "READ_ONLY"
    assert answer["policy"] == "authorization/read-only-viewers"


def test_a_handler_exception_is_classified_and_answered_in_the_ack(flask_served, sync_clients):
    served = flask_served()
    client, _ = sync_clients.connect(served.url)

    failure = client.call("boom", {}, timeout=WAIT)

    assert failure["code"] == "INTERNAL"
    assert failure["category"] == "system"
    assert "hunter2" not in str(failure)
    hook, _, raw, reported = served.observer.errors[-1]
    assert (hook, raw["type"]) == ("event", "RuntimeError")
    assert reported["correlation_id"] == failure["correlation_id"]
    assert client.call("echo", 1, timeout=WAIT) == 1


def test_a_failure_without_an_ack_is_sent_as_the_error_event(flask_served, sync_clients):
    served = flask_served()
    client, received = sync_clients.connect(served.url)

    client.emit("boom", {})
    client.emit("oh_user_action", {"no": "action"})

    wait_for(lambda: len(received["policy_error"]) == 2)
    codes = sorted(payload["code"] for payload in received["policy_error"])
    assert codes == ["INTERNAL", "INVALID_PAYLOAD"]


def test_an_oversized_event_is_refused_by_its_measured_size(flask_served, sync_clients):
    served = flask_served()
    client, _ = sync_clients.connect(served.url)

    small = client.call("echo", "é" * 100, timeout=WAIT)
    large = client.call("echo", "é" * 40_000, timeout=WAIT)  # 80 KB of UTF-8 > 64KB

    assert small == "é" * 100
    assert large["code"] == "PAYLOAD_TOO_LARGE"
    assert large["policy"] == "events/*"


def test_a_client_cannot_reach_the_disconnect_handler_with_an_event(flask_served, sync_clients):
    disconnects: list[str] = []

    def app(ext: SocketIO) -> None:
        conversation_app(ext)

        @ext.on("disconnect")
        def gone(*_: Any) -> None:
            disconnects.append(request.sid)  # type: ignore[attr-defined]

    served = flask_served(flask_setup=app)
    client, _ = sync_clients.connect(served.url)

    answer = client.call("disconnect", {}, timeout=WAIT)

    assert answer["code"] == "INVALID_REQUEST"
    assert answer["policy"] == "connections/protocol"
    assert disconnects == []
    assert client.call("echo", 2, timeout=WAIT) == 2


def test_a_disconnect_releases_what_the_connection_held(flask_served, sync_clients):
    served = flask_served()
    client, _ = sync_clients.connect(served.url, auth={"token": mint("carol")})
    assert served.engine.local.connection_counts() == (1, 1, 1)

    client.disconnect()

    wait_for(lambda: served.adapter.active_connections() == 0)
    wait_for(lambda: served.engine.local.connection_counts() == (0, 0, 0))
    assert [event for event, _, _ in served.observer.connections] == ["opened", "closed"]


def test_a_connect_over_the_per_user_ceiling_gets_its_advice_and_a_closed_session(
    flask_served, sync_clients
):
    served = flask_served()
    token = mint("dave")
    for _ in range(5):
        sync_clients.connect(served.url, auth={"token": token})
    client, _ = sync_clients.new()

    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(
            f"{served.url}?conversation_id=c1",
            auth={"token": token},
            headers=fresh_ip(),
            transports=["websocket"],
            wait_timeout=2,
        )

    decision = served.observer.decisions[-1][1]
    assert decision.rule == "connections/max_per_user"
    assert decision.payload["code"] == "TOO_MANY_CONNECTIONS"
    assert served.engine.local.connection_counts() == (5, 1, 5)


QUEUE_POLICY = """
version: 1
connections:
  max_total: 1
  retry_after: 2s
  queue:
    max_wait: 8s
    max_length: 1
"""


def plain_app(ext: SocketIO) -> None:
    @ext.on("connect")
    def connect(auth: Any) -> None:
        return None


def test_a_connect_over_the_ceiling_waits_its_turn_and_is_admitted(flask_served, sync_clients):
    served = flask_served(QUEUE_POLICY, flask_setup=plain_app)
    holder, _ = sync_clients.connect(served.url, query="")
    waiter, _ = sync_clients.new()
    connecting = threading.Thread(
        target=waiter.connect,
        args=(served.url,),
        kwargs={"transports": ["websocket"], "wait_timeout": WAIT},
    )
    connecting.start()
    wait_for(lambda: served.adapter.admission.waiting == 1)

    holder.disconnect()
    connecting.join(WAIT)

    assert waiter.connected
    assert served.adapter.admission.waiting == 0
    outcomes = [d.outcome.value for hook, d, _ in served.observer.decisions if hook == "connect"]
    assert outcomes == ["allow", "allow"]  # judged once more at its turn, not refused


EMIT_POLICY = """
version: 1
rate_limits:
  - name: news-per-connection
    hook: emit
    when: event.name == "news"
    key: conn.sid
    limit: 2/minute
    burst: 2
"""


def test_emit_hook_rules_drop_what_they_refuse(flask_served, sync_clients):
    def app(ext: SocketIO) -> None:
        @ext.on("connect")
        def connect(auth: Any) -> None:
            return None

    served = flask_served(EMIT_POLICY, flask_setup=app)
    client, _ = sync_clients.new()
    news: list[Any] = []
    client.on("news", news.append)
    markers: list[Any] = []
    client.on("oh_event", markers.append)
    client.connect(served.url, transports=["websocket"], wait_timeout=WAIT)

    assert served.ext is not None
    for n in range(5):
        served.ext.emit("news", {"n": n}, to=client.get_sid())
    served.ext.emit("oh_event", {"marker": True}, to=client.get_sid())

    wait_for(lambda: bool(markers))
    assert news == [{"n": 0}, {"n": 1}]
    assert [reason for _, _, reason in served.observer.drops] == [
        "rate_limits/news-per-connection"
    ] * 3


def test_a_swap_applies_the_new_policy_to_the_next_event(flask_served, sync_clients, tmp_path):
    served = flask_served(ACTION_LIMIT)
    client, _ = sync_clients.connect(served.url)
    before = client.call("oh_user_action", {"action": "run"}, timeout=WAIT)
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(ACTION_LIMIT.replace("burst: 3", "burst: 1"), encoding="utf-8")

    served.adapter.swap(compile_file(stricter).policy)

    after = client.call("oh_user_action", {"action": "run"}, timeout=WAIT)
    assert before == {"ok": True}
    assert after["code"] == "RATE_LIMITED"  # the rule kept its name, so its state


GATED_POLICY = """
version: 1
shedding:
  - name: overloaded-connect
    hook: connect
    when: load.active_connections > 0
    action: reject
    retry_after: 5s
"""


def test_the_wsgi_gate_refuses_new_sessions_before_engine_io(flask_served, sync_clients):
    import urllib.error
    import urllib.request

    served = flask_served(GATED_POLICY, gate=True)
    sync_clients.connect(served.url)  # admitted: nobody was connected
    served.engine.load = {**served.engine.load, "active_connections": 1}

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{served.url}/socket.io/?EIO=4&transport=polling", timeout=WAIT)

    assert refused.value.code == 503
    assert refused.value.headers["Retry-After"] == "5"
    payload = json.loads(refused.value.read())
    assert payload["policy"] == "shedding/overloaded-connect"
    assert payload["retry_after_ms"] == 5000


# -- through Flask-SocketIO's test client ---------------------------------------------------------


@pytest.fixture
def flask_test_app(flask_served: StartFlask) -> Callable[..., tuple[SocketIO, Flask, SyncServed]]:
    """A Flask-SocketIO app under a policy, for its test client (served too, unused)."""

    def start(policy_text: str | None = None) -> tuple[SocketIO, Flask, SyncServed]:
        served = flask_served(policy_text)
        assert served.ext is not None
        assert served.flask is not None
        return served.ext, served.flask, served

    return start


def test_the_test_client_is_refused_without_a_conversation(flask_test_app):
    ext, app, served = flask_test_app()

    client = ext.test_client(app, headers=fresh_ip())

    assert not client.is_connected()
    decision = served.observer.decisions[-1][1]
    assert decision.payload["code"] == "CONVERSATION_REQUIRED"
    assert served.adapter.active_connections() == 0


def test_the_test_client_is_admitted_and_its_payloads_and_actions_judged(flask_test_app):
    ext, app, served = flask_test_app()
    viewer = ext.test_client(
        app,
        query_string="conversation_id=c1",
        headers=fresh_ip(),
        auth={"token": mint("erin", {"role": "viewer"})},
    )
    client = ext.test_client(app, query_string="conversation_id=c1", headers=fresh_ip())
    assert client.is_connected()
    assert viewer.is_connected()
    assert served.adapter.active_connections() == 2

    denied = viewer.emit("oh_user_action", {"action": "run"}, callback=True)
    invalid = client.emit("oh_user_action", {"args": {}}, callback=True)
    accepted = client.emit("oh_user_action", {"action": "run"}, callback=True)

    assert denied["code"] == "READ_ONLY"
    assert invalid["code"] == "INVALID_PAYLOAD"
    assert accepted == {"ok": True}


def test_the_test_client_is_rate_limited(flask_test_app):
    ext, app, _ = flask_test_app(ACTION_LIMIT)
    client = ext.test_client(app, headers=fresh_ip())

    answers = [client.emit("oh_user_action", {"action": "run"}, callback=True) for _ in range(4)]

    assert answers[:3] == [{"ok": True}] * 3
    assert answers[3]["code"] == "RATE_LIMITED"


def test_the_test_client_hears_classified_errors_in_its_ack_or_as_the_error_event(flask_test_app):
    ext, app, served = flask_test_app()
    client = ext.test_client(app, query_string="conversation_id=c1", headers=fresh_ip())

    in_ack = client.emit("boom", {}, callback=True)
    client.emit("boom", {})

    assert in_ack["code"] == "INTERNAL"
    received = client.get_received()
    assert [(r["name"], r["args"][0]["code"]) for r in received] == [("policy_error", "INTERNAL")]
    assert served.observer.errors[-1][2]["type"] == "RuntimeError"
    client.disconnect()
    assert served.adapter.active_connections() == 0
