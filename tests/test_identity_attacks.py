"""Who is connecting, tried as a hostile client would: through a real server, real clients.

Each test is an attack that worked when the user id was whatever the client said, tokens
were never verified, and replay trusted the query string.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import socketio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from servers import SHIPPED_POLICY, eventually

from policy_engine.cli.token import DEV_AUDIENCE, DEV_ISSUER, mint

DEV_JWKS = SHIPPED_POLICY.parent / "keys" / "dev-jwks.json"
_addresses = itertools.count(1)


def fresh_ip() -> dict[str, str]:
    """A client address of its own (the test server's uvicorn takes it from the header)."""
    return {"X-Forwarded-For": f"198.51.100.{next(_addresses) % 250 + 1}"}


def required_policy(keys: str) -> str:
    return f"""
version: 1
authentication:
  providers:
    dev:
      issuer: {DEV_ISSUER}
      audiences: [{DEV_AUDIENCE}]
      algorithms: [ES256]
      keys: {keys}
      from:
        - {{header: Authorization, prefix: "Bearer "}}
        - {{auth: token}}
  default: {{providers: [dev], require: required}}
errors:
  - name: expired
    when: error.code == "AUTH_EXPIRED"
    category: connection
    code: AUTH_EXPIRED
    message: Your session has expired.
  - name: auth
    when: error.type == "AuthenticationError"
    category: connection
    code: AUTH_FAILED
    message: Authentication failed.
"""


def conversation_app(sio: socketio.AsyncServer) -> None:
    """Joins the room the query names (its first value), for members only when asked."""

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        room = parse_qs(environ["QUERY_STRING"]).get("conversation_id", [""])[0]
        members_only = isinstance(auth, dict) and "member" in auth
        if room and (not members_only or auth["member"]):
            await sio.enter_room(sid, room)


def new_key(tmp_path: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """A fresh EC P-256 key: the private PEM's path and the public JWK (kid = name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / f"{name}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return path, {**jwk, "kid": name, "alg": "ES256", "use": "sig"}


# -- tokens ------------------------------------------------------------------------------------


async def test_a_verified_token_names_the_user_and_a_good_one_gets_in(serve, clients):
    served = serve(required_policy(f"{{jwks_file: {DEV_JWKS}}}"), setup=conversation_app)
    client, _ = await clients.connect(
        served.url, auth={"token": mint("alice", {"plan": "pro"})}, headers=fresh_ip()
    )
    state = served.adapter.connections()[client.get_sid()]
    assert state.conn["user_id"] == "alice"
    assert state.claims["plan"] == "pro"


def _unsigned(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, None, algorithm="none")


def _claims(**overrides: Any) -> dict[str, Any]:
    import time

    now = int(time.time())
    return {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "mallory", "exp": now + 600} | overrides


@pytest.mark.parametrize(
    ("forge", "code"),
    [
        ("alg_none", "AUTH_FAILED"),
        ("wrong_signature", "AUTH_FAILED"),
        ("wrong_audience", "AUTH_FAILED"),
        ("expired", "AUTH_EXPIRED"),
        ("unknown_kid", "AUTH_FAILED"),
        ("no_token", "AUTH_FAILED"),
        ("garbage", "AUTH_FAILED"),
    ],
)
async def test_forged_or_stale_tokens_are_refused_with_their_code(
    serve, clients, tmp_path, forge, code
):
    served = serve(required_policy(f"{{jwks_file: {DEV_JWKS}}}"), setup=conversation_app)
    other_key, _ = new_key(tmp_path, "dev-1")  # same kid as the real key, another key
    tokens = {
        "alg_none": _unsigned(_claims()),
        "wrong_signature": mint("mallory", key=other_key),
        "wrong_audience": mint("mallory", audience="another-service"),
        "expired": mint("mallory", ttl=-600),
        "unknown_kid": mint("mallory", kid="dev-9"),
        "no_token": None,
        "garbage": "eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln",
    }
    auth = {"token": tokens[forge]} if tokens[forge] else None
    refusal = await clients.refused(served.url, auth=auth, headers=fresh_ip())
    assert refusal["data"]["code"] == code
    assert refusal["data"]["retryable"] is False
    assert served.adapter.active_connections() == 0


async def test_a_token_in_a_place_the_policy_does_not_read_is_not_used(serve, clients):
    served = serve(required_policy(f"{{jwks_file: {DEV_JWKS}}}"), setup=conversation_app)
    refusal = await clients.refused(served.url, query={"token": mint("alice")}, headers=fresh_ip())
    assert refusal["data"]["code"] == "AUTH_FAILED"
    errors = [error for _, _, error, _ in served.observer.errors]
    assert "unexpected_location" in errors[-1]["message"]
    assert "eyJ" not in json.dumps(errors, default=str)  # the token itself is never reported


class JwksServer:
    """A JSON Web Key Set on loopback whose keys a test rotates; it counts its requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


async def test_a_rotated_key_is_accepted_after_one_refresh_and_no_more(
    serve, clients, tmp_path, jwks
):
    first_pem, first_jwk = new_key(tmp_path, "k1")
    second_pem, second_jwk = new_key(tmp_path, "k2")
    jwks.keys = [first_jwk]
    keys = f"{{jwks_url: {jwks.url}, min_refresh_interval: 1h}}"
    served = serve(required_policy(keys), setup=conversation_app)

    await clients.connect(
        served.url, auth={"token": mint("alice", key=first_pem, kid="k1")}, headers=fresh_ip()
    )
    assert jwks.requests == 1

    jwks.keys = [first_jwk, second_jwk]  # the identity provider rotates
    await clients.connect(
        served.url, auth={"token": mint("bob", key=second_pem, kid="k2")}, headers=fresh_ip()
    )
    assert jwks.requests == 2

    # An unknown kid within the refresh interval costs the identity provider nothing.
    for _ in range(5):
        refusal = await clients.refused(
            served.url, auth={"token": mint("eve", key=second_pem, kid="k3")}, headers=fresh_ip()
        )
        assert refusal["data"]["code"] == "AUTH_FAILED"
    assert jwks.requests == 2


# -- identities the client cannot choose -----------------------------------------------------


async def test_a_client_chosen_user_id_is_ignored_and_the_real_user_keeps_her_slots(serve, clients):
    served = serve(setup=conversation_app)  # the shipped policy: at most 5 per user
    for _ in range(5):
        client, _ = await clients.connect(
            served.url,
            auth={"user_id": "alice"},
            query={"conversation_id": "c1"},
            headers=fresh_ip(),
        )
        state = served.adapter.connections()[client.get_sid()]
        assert state.conn["user_id"] == ""
        assert state.conn["priority"] == 0  # still an anonymous viewer, first to be shed

    for _ in range(5):
        client, _ = await clients.connect(
            served.url,
            auth={"token": mint("alice")},
            query={"conversation_id": "c1"},
            headers=fresh_ip(),
        )
        assert served.adapter.connections()[client.get_sid()].conn["user_id"] == "alice"


async def test_a_huge_client_id_is_refused_and_leaves_no_key_behind(serve, clients):
    served = serve(setup=conversation_app)
    huge = "u" * 500_000
    refusal = await clients.refused(
        served.url,
        auth={"user_id": huge},
        query={"conversation_id": "c1"},
        headers=fresh_ip(),
    )
    assert refusal["data"]["code"] == "INVALID_REQUEST"
    assert refusal["data"]["retryable"] is False
    assert served.adapter.active_connections() == 0
    store = served.engine.local
    remembered = json.dumps([list(v) for v in vars(store).values() if isinstance(v, dict)])
    assert "uuuuuuuuuu" not in remembered
    logged = json.dumps([error for _, _, error, _ in served.observer.errors], default=str)
    assert "uuuuuuuuuu" not in logged


async def test_failure_counters_survive_the_attackers_own_successes(serve, clients):
    served = serve(setup=conversation_app)  # shipped: throttled from the 3rd failure on
    me = fresh_ip()

    def bad() -> dict[str, str]:
        return {"token": mint("mallory", audience="another-service")}

    for attempt in (bad(), bad(), {"token": mint("mallory")}, bad()):
        with contextlib.suppress(socketio.exceptions.ConnectionError):
            await clients.connect(
                served.url, auth=attempt, query={"conversation_id": "c1"}, headers=me
            )
    # Three failures from this address, whatever succeeded in between: the next waits.
    refusal = await clients.refused(
        served.url, auth={"token": mint("mallory")}, query={"conversation_id": "c1"}, headers=me
    )
    assert refusal["data"]["code"] == "AUTH_THROTTLED"


# -- replay only to members --------------------------------------------------------------------


async def _secret_history(served: Any, clients: Any) -> None:
    """Three events in conversation ``secret``, while one of its members is connected."""
    await clients.connect(served.url, query={"conversation_id": "secret"}, headers=fresh_ip())
    for n in range(3):
        await served.emit("oh_event", {"id": n, "text": f"secret {n}"}, room="secret")


async def test_a_repeated_conversation_parameter_reads_nothing_of_either(serve, clients):
    served = serve(setup=conversation_app)
    await _secret_history(served, clients)
    query = "conversation_id=public&conversation_id=secret&latest_event_id=0"
    client, inbox = clients.new(listen=("oh_event",))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(f"{served.url}?{query}", transports=["websocket"], wait_timeout=5)
    await inbox.until(lambda: bool(inbox.errors))
    assert inbox.errors[-1]["data"]["code"] == "INVALID_REQUEST"
    assert inbox.of("oh_event") == []


async def test_replay_reaches_only_a_socket_the_application_let_into_the_conversation(
    serve, clients
):
    served = serve(setup=conversation_app)
    await _secret_history(served, clients)

    _, outsider = await clients.connect(
        served.url,
        query={"conversation_id": "secret", "latest_event_id": "0"},
        auth={"member": False},
        headers=fresh_ip(),
    )
    _, member = await clients.connect(
        served.url,
        query={"conversation_id": "secret", "latest_event_id": "0"},
        auth={"member": True},
        headers=fresh_ip(),
    )
    await member.until(lambda: len(member.of("oh_event")) == 2)
    assert [event["id"] for event in member.of("oh_event")] == [1, 2]
    await eventually(lambda: served.adapter.active_connections() == 3)
    assert outsider.of("oh_event") == []


class SessionTable:
    """An application's own sign-in check, in the loader form ``serve --claims-loader`` takes."""

    async def load(self, handshake: Any) -> dict[str, Any] | None:
        session = handshake.cookies.get("session")
        return {"sub": "carol", "plan": "pro"} if session == "valid-session" else None


async def test_the_applications_own_loader_is_the_provider_app(serve, clients):
    served = serve(setup=conversation_app, claims_loader=SessionTable())
    client, _ = await clients.connect(
        served.url,
        query={"conversation_id": "c1"},
        headers={**fresh_ip(), "Cookie": "session=valid-session"},
    )
    anonymous, _ = await clients.connect(
        served.url, query={"conversation_id": "c1"}, headers=fresh_ip()
    )
    assert served.adapter.connections()[client.get_sid()].conn["user_id"] == "carol"
    assert served.adapter.connections()[anonymous.get_sid()].conn["user_id"] == ""
