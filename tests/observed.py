"""A live ``PolicyServer`` whose every metric has a series, for the monitoring tests.

:func:`start_observed` builds the server exactly as ``policy-engine serve`` does
(:func:`~policy_engine.server.app.build_app`: the Prometheus observer, the reloader, the
load sampler, the operations endpoints) around the demo app and two handlers of its own,
under :data:`OBSERVED_POLICY`, and serves it on loopback. :func:`drive` then makes real
clients do what an operator's alerts and dashboard look at: allowed and rate-limited events,
a shadow refusal, errors (one classified ``alert: true``), a breaker opening, a successful
and a refused reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import socketio
from servers import WAIT, Clients, LiveServer

from policy_engine.server import demo
from policy_engine.server.app import PolicyServer, build_app
from policy_engine.state.memory import StateStore

OBSERVED_POLICY = """\
version: 1
errors:
  - name: exhausted
    when: error.type == "OSError"
    category: system
    severity: critical
    code: RESOURCE_EXHAUSTED
    retryable: true
    alert: true
  - name: internal
    when: "true"
    category: system
    severity: error
    code: INTERNAL
rate_limits:
  - name: pings
    hook: event
    when: event.name == "ping"
    key: conn.sid
    limit: 2/minute
    burst: 2
    key_label: true
  - name: pings-watched
    hook: event
    when: event.name == "ping"
    key: conn.sid
    limit: 1/minute
    burst: 1
    mode: shadow
circuit_breakers:
  - name: storage
    match: event.name == "store"
    failure_rate: 50%
    window: {calls: 4}
    minimum_calls: 2
    open_for: 10m
shedding:
  - name: shed-crowd
    when: load.active_connections > 100000
    action: disconnect
connections:
  max_total: 100
"""
CONVERSATION = {"conversation_id": "c1"}


@dataclass
class Observed:
    """The server, where it listens, and its policy file (rewritten by :func:`drive`)."""

    server: PolicyServer
    live: LiveServer
    policy: Path

    @property
    def url(self) -> str:
        return self.live.url

    def stop(self) -> None:
        self.live.stop()


def start_observed(
    tmp_path: Path, store: StateStore | None = None, *, ops_token: str | None = None
) -> Observed:
    """Serve the demo app, plus ``ping`` (answers) and ``store`` (raises OSError), under
    :data:`OBSERVED_POLICY`; the operations endpoints answer on the public listener, to
    anyone or, with ``ops_token``, to that bearer token only."""
    policy = tmp_path / "observed.yaml"
    policy.write_text(OBSERVED_POLICY, encoding="utf-8")
    sio = demo.create_server()

    async def ping(sid: str, data: Any) -> str:
        return "pong"

    async def store_event(sid: str, data: Any) -> None:
        raise OSError("disk full")

    sio.on("ping", ping)
    sio.on("store", store_event)
    server = build_app(
        sio,
        policy,
        store=store,
        ops_token=ops_token,
        public_operations=ops_token is None,
        sample_interval=0.05,
    )
    live = LiveServer(server)
    live.start()
    return Observed(server, live, policy)


async def drive(observed: Observed, clients: Clients) -> socketio.AsyncClient:
    """Traffic that gives every metric a series; returns the client, still connected.

    Three pings (two allowed, one refused and counted by key; the shadow rule would have
    refused two), two failing ``store`` calls (RESOURCE_EXHAUSTED, alert: true) that open
    the ``storage`` breaker, one reload that succeeds and one that is refused.
    """
    client, _ = await clients.connect(observed.url, query=CONVERSATION)
    for _ in range(3):
        await client.call("ping", {}, timeout=WAIT)
    for _ in range(2):
        await client.call("store", {}, timeout=WAIT)
    reloader = observed.server.reloader
    assert await observed.live.run(reloader.reload_async())
    valid = observed.policy.read_text(encoding="utf-8")
    observed.policy.write_text(valid.replace("limit: 2/minute", "limit: 2/fortnight"), "utf-8")
    assert not await observed.live.run(reloader.reload_async())
    observed.policy.write_text(valid, encoding="utf-8")
    return client
