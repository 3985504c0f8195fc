"""The echo server both throughput runs use: bare python-socketio, or behind the policy.

    python -m benchmarks.echo_server --mode bare|policy --port PORT [--policies FILE]

The same handlers serve both modes; `policy` adds exactly what `policy-engine serve`
adds (the adapter, the overload gate, the load sampler, metrics and logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import socketio
import uvicorn

SHIPPED = Path(__file__).resolve().parent.parent / "policies" / "policies.yaml"


def create_sio() -> socketio.AsyncServer:
    sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        return None

    @sio.event
    async def echo(sid: str, data: Any) -> Any:
        return data

    return sio


def create_app(mode: str, policies: Path) -> Any:
    sio = create_sio()
    if mode == "bare":
        return socketio.ASGIApp(sio)
    from policy_engine.observe.logs import configure_logging
    from policy_engine.server.app import build_app

    configure_logging("json")  # as `policy-engine serve` does by default
    return build_app(sio, policies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("bare", "policy"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--policies", type=Path, default=SHIPPED)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    app = create_app(args.mode, args.policies)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, ws="wsproto", log_level="error", lifespan="auto"
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
