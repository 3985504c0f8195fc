"""The echo server every throughput run uses: bare python-socketio, or behind a policy.

    python -m benchmarks.echo_server --mode bare|policy|every --port PORT [--policies FILE]

The same handlers serve every mode; `policy` and `every` add exactly what
`policy-engine serve` adds (the adapter, the overload gate, the load sampler, metrics and
logs). `policy` runs the shipped policy, where the echo falls to `"*"` (its size and
shedding only); `every` runs the shipped policy with `echo` in place of `oh_user_action`,
so the echo meets every rule a user action meets: an enforced GCRA per connection (its
rate raised out of reach: the benchmark measures the checks, not refusals), the shadow
sliding window per conversation, the breaker, the JSON Schema and the authorization rule.
Both edit the shipped file only as :data:`EDITS` says, in a copy beside its keys and
schemas.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import socketio
import uvicorn

from policy_engine.server.listen import bind_listener

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"

# The shipped policy's lines, and what they become per mode: every one must be found.
# Clients connect from distinct addresses through the loopback proxy (as users behind a
# load balancer do), so the per-IP connect limit does not hold the crowd back.
PROXY = {"  trusted_proxies: []": "  trusted_proxies: [127.0.0.1/32]"}
EDITS: dict[str, dict[str, str]] = {
    "policy": PROXY,
    "every": {
        **PROXY,
        'event.name == "oh_user_action"': 'event.name == "echo"',
        "  oh_user_action:\n    schema:": "  echo:\n    schema:",
        "    limit: 50/second\n    burst: 50\n": "    limit: 1000000/second\n    burst: 1000000\n",
        # The shadow window is kept in shadow, its limit out of reach too (else every
        # echo past it is a shadowed refusal, logged). It holds one timestamp per echo
        # of its conversation in the last second: about as many as 600/minute at its limit.
        "    limit: 600/minute\n    algorithm: sliding_window\n": (
            "    limit: 10000/second\n    algorithm: sliding_window\n"
        ),
    },
}


def edited_policy(mode: str, directory: Path, source: Path = SHIPPED) -> Path:
    """``source`` edited for ``mode`` (:data:`EDITS`), beside copies of its keys and schemas."""
    text = source.read_text(encoding="utf-8")
    for old, new in EDITS[mode].items():
        if old not in text:
            raise SystemExit(f"the shipped policy no longer has {old!r}: update EDITS")
        text = text.replace(old, new)
    for folder in ("keys", "events"):
        shutil.copytree(source.parent / folder, directory / folder)
    path = directory / "policies.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def create_sio() -> socketio.AsyncServer:
    sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        return None

    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data

    return sio


def create_app(mode: str, policies: Path | None, directory: Path) -> Any:
    sio = create_sio()
    if mode == "bare":
        return socketio.ASGIApp(sio)
    from policy_engine.observe.logs import configure_logging
    from policy_engine.server.app import build_app

    configure_logging("json")  # as `policy-engine serve` does by default
    return build_app(sio, policies or edited_policy(mode, directory))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("bare", *EDITS), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--policies", type=Path, default=None, help="instead of the edits")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    # Behind a policy the port is listened on before the policy loads, as `policy-engine
    # serve` does (policy_engine.server.listen); bare, uvicorn binds it once it starts.
    listening = None if args.mode == "bare" else bind_listener("127.0.0.1", args.port)
    with tempfile.TemporaryDirectory() as directory:
        app = create_app(args.mode, args.policies, Path(directory))
        config = uvicorn.Config(
            app, host="127.0.0.1", port=args.port, ws="wsproto", log_level="error", lifespan="auto"
        )
        sockets = None if listening is None else [listening]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(uvicorn.Server(config).serve(sockets=sockets))


if __name__ == "__main__":
    main()
