"""The ``policy-engine`` command.

``main(argv) -> int`` is testable without a subprocess; the library knows nothing of
argparse. Exit codes: 0 valid / passed, 1 invalid policy or failed tests, 2 usage errors.
Heavy imports (the server, Redis) happen inside the commands that need them, so
``policy-engine validate`` starts fast in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from policy_engine import __version__
from policy_engine.errors import Diagnostic, PolicyEngineError, PolicyError, Severity
from policy_engine.language.contexts import Hook

if TYPE_CHECKING:
    from policy_engine.server.app import PolicyServer

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policy-engine",
        description="Declarative reliability policies for python-socketio servers.",
    )
    parser.add_argument("--version", action="version", version=f"policy-engine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate", help="check policy files: schema, references, CEL types"
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy files to check")
    validate.add_argument(
        "--format", choices=("text", "json", "github"), default="text", help="output format"
    )
    validate.add_argument(
        "--strict", action="store_true", help="treat warnings as errors (exit 1 on any)"
    )
    validate.add_argument(
        "--cel-backend",
        choices=("cel-expr-python", "cel-python"),
        help="CEL engine (default: cel-expr-python when installed)",
    )

    commands.add_parser("schema", help="print the policy file's JSON Schema")

    explain = commands.add_parser(
        "explain", help="evaluate one decision and print it with every rule considered"
    )
    explain.add_argument("--policies", required=True, metavar="FILE", help="policy file")
    explain.add_argument(
        "--hook", required=True, choices=[h.value for h in _hooks()], help="hook to run"
    )
    explain.add_argument(
        "--context",
        default="{}",
        metavar="JSON",
        help='contexts as JSON, e.g. \'{"conn": {"ip": "1.2.3.4"}, "load": {"loop_lag_ms": 300}}\'',
    )
    explain.add_argument("--format", choices=("text", "json"), default="text")
    explain.add_argument("--cel-backend", choices=("cel-expr-python", "cel-python"))

    test = commands.add_parser("test", help="run policy unit tests written in YAML")
    test.add_argument("paths", nargs="+", metavar="PATH", help="test files or folders")
    test.add_argument("--format", choices=("text", "json"), default="text")
    test.add_argument("--cel-backend", choices=("cel-expr-python", "cel-python"))

    serve = commands.add_parser(
        "serve", help="run a python-socketio app under a policy (uvicorn, hot reload on SIGHUP)"
    )
    serve.add_argument(
        "app",
        nargs="?",
        metavar="MODULE:ATTR",
        help="a socketio.AsyncServer(async_mode='asgi'); default: the built-in demo app",
    )
    serve.add_argument("--policies", required=True, metavar="FILE", help="policy file")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="bind port (default 8000)")
    serve.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: console at a terminal, JSON lines otherwise",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.add_argument("--socketio-path", default="socket.io", help="Socket.IO endpoint path")
    serve.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a shutdown waits for connections to close",
    )
    serve.add_argument("--cel-backend", choices=("cel-expr-python", "cel-python"))
    serve.add_argument(
        "--store",
        default=os.environ.get("POLICY_ENGINE_STORE", "memory"),
        metavar="URL",
        help="shared state store: memory (default; each process its own), or Redis, where"
        " several processes share limits, breakers, connection counts and replay buffers and"
        " the demo app's emits reach the clients of every process:"
        " redis://host:port/db, redis+cluster://host:port[,host:port...] (Redis Cluster) or"
        " redis+sentinel://host:port[,host:port...]/service[/db] (the master Sentinel names);"
        " default from POLICY_ENGINE_STORE",
    )
    serve.add_argument(
        "--no-redis-manager",
        dest="redis_manager",
        action="store_false",
        help="with a Redis store, share only the policy's state: the demo app's emits then"
        " reach only the clients of the process that makes them (by default they are"
        " relayed to every process through the same Redis)",
    )
    serve.add_argument(
        "--ops-port",
        type=int,
        default=_env_int("POLICY_ENGINE_OPS_PORT"),
        metavar="PORT",
        help="serve /metrics and /status (and /healthz, /readyz) on a listener of their own;"
        " default from POLICY_ENGINE_OPS_PORT, else none. On the public listener they answer"
        " only with Authorization: Bearer $POLICY_ENGINE_OPS_TOKEN",
    )
    serve.add_argument(
        "--claims-loader",
        metavar="MODULE:ATTR",
        help="the application's own check of who connects: an object (or class) with"
        " 'async def load(self, handshake)'; the provider 'app' of the policy's authentication",
    )
    serve.add_argument(
        "--ops-host", default="127.0.0.1", help="operations listener address (default 127.0.0.1)"
    )
    serve.add_argument(
        "--candidate",
        metavar="FILE",
        help="a second policy judged in shadow on live traffic, on its own state: what it"
        " would decide differently is counted in metrics, shown in /status and logged;"
        " clients get only the enforced policy's decisions. SIGHUP reloads it too",
    )
    serve.add_argument(
        "--watch",
        action="store_true",
        help="reload when the policy file (or the candidate, or an event schema they name)"
        " changes, a Kubernetes ConfigMap's symlink swap included; as SIGHUP does",
    )
    _add_replay(commands)
    token = commands.add_parser(
        "token", help="print a signed JWT (by default with the shipped development key)"
    )
    token.add_argument("subject", help="the sub claim: who the token is for")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='an extra claim, e.g. role="viewer" or plan=pro (repeatable)',
    )
    token.add_argument("--ttl", default="1h", help="how long it is valid (default 1h)")
    token.add_argument("--key", help="PEM private key (default: policies/keys/dev-signing-key.pem)")
    token.add_argument("--algorithm", default="ES256")
    token.add_argument("--kid", default="dev-1")
    token.add_argument("--issuer", default="policy-engine-dev")
    token.add_argument("--audience", default="policy-engine-demo")
    return parser


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay", help="judge logged decisions again under a candidate policy: what would change"
    )
    replay.add_argument("logs", nargs="+", metavar="LOG", help="decision logs, oldest first")
    replay.add_argument("--policies", required=True, metavar="FILE", help="the candidate policy")
    replay.add_argument(
        "--max-changed",
        metavar="N|P%",
        help="exit 1 when more decisions than this would change (a count, or a share: 1%%)",
    )
    replay.add_argument("--examples", type=int, default=5, help="examples per kind (default 5)")
    replay.add_argument("--json", action="store_true", help="the report as JSON")
    replay.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="a progress bar on standard error (auto: when it is a terminal)",
    )
    replay.add_argument("--cel-backend", choices=("cel-expr-python", "cel-python"))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    stdout = out or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if args.command == "validate":
        return _validate(args.files, args.format, args.strict, args.cel_backend, stdout)
    if args.command == "explain":
        return _explain(args, stdout)
    if args.command == "test":
        return _test(args.paths, args.format, args.cel_backend, stdout)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args, stdout)
    if args.command == "replay":
        from policy_engine.cli.replay import run

        return run(args, stdout)
    if args.command == "schema":
        from policy_engine.language.schema import schema_path

        stdout.write(schema_path().read_text(encoding="utf-8"))
        return EXIT_OK
    parser.print_usage(sys.stderr)
    return EXIT_USAGE


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


def _token(args: argparse.Namespace, out: TextIO) -> int:
    from policy_engine.cli.token import default_key, mint
    from policy_engine.errors import UnitError
    from policy_engine.language.units import parse_duration

    claims: dict[str, object] = {}
    for item in args.claim:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            sys.stderr.write(f"policy-engine token: --claim {item!r}: expected NAME=VALUE\n")
            return EXIT_USAGE
        try:
            claims[name] = json.loads(raw)
        except ValueError:
            claims[name] = raw
    try:
        ttl = parse_duration(args.ttl)
        token = mint(
            args.subject,
            claims,
            key=args.key or default_key(),
            algorithm=args.algorithm,
            kid=args.kid or None,
            issuer=args.issuer,
            audience=args.audience,
            ttl=ttl,
        )
    except (UnitError, OSError, ValueError) as exc:
        sys.stderr.write(f"policy-engine token: {exc}\n")
        return EXIT_USAGE
    out.write(token + "\n")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    """Exit 1 on an invalid policy (nothing starts), 2 on a bad MODULE:ATTR or store URL."""
    import asyncio

    from policy_engine.server.listen import bind_listener

    # Listen before loading anything: see policy_engine.server.listen.
    try:
        listener = bind_listener(args.host, args.port)
    except OSError as exc:
        sys.stderr.write(f"policy-engine serve: cannot listen on {args.host}:{args.port}: {exc}\n")
        return EXIT_INVALID
    with listener:
        from policy_engine.observe.logs import configure_logging
        from policy_engine.server.app import serve

        configure_logging(args.log_format, level=args.log_level)
        server = server_for(args)
        if isinstance(server, int):
            return server
        try:
            asyncio.run(
                serve(
                    server,
                    args.host,
                    args.port,
                    graceful_timeout=args.graceful_timeout,
                    ops_host=args.ops_host,
                    ops_port=args.ops_port,
                    listening=listener,
                )
            )
        except SystemExit as exc:  # uvicorn exits this way when it cannot start
            return exc.code if isinstance(exc.code, int) else EXIT_INVALID
    return EXIT_OK


def server_for(args: argparse.Namespace) -> PolicyServer | int:
    """What ``serve`` would run for these arguments, not yet started; or its exit code.

    On a Redis store the demo app it creates relays its emits through the same Redis
    (unless ``--no-redis-manager``); an application named by ``MODULE:ATTR`` keeps its own
    client manager, with a warning when that one reaches only this process's clients.
    """
    from policy_engine.auth.loader import import_claims_loader
    from policy_engine.server.app import AppImportError, build_app, load_server, open_store
    from policy_engine.server.relay import redis_manager, warn_if_emits_stay_local

    if args.app or args.claims_loader:
        # As uvicorn does: the app's module (and the claims loader's) is found from here.
        sys.path.insert(0, os.getcwd())
    try:
        store = open_store(args.store)
        loader = import_claims_loader(args.claims_loader) if args.claims_loader else None
    except (ValueError, ImportError) as exc:
        sys.stderr.write(f"policy-engine serve: {exc}\n")
        return EXIT_USAGE
    relayed = args.redis_manager and args.app is None
    try:
        sio = load_server(args.app, client_manager=redis_manager(store) if relayed else None)
    except AppImportError as exc:
        sys.stderr.write(f"policy-engine serve: {exc}\n")
        return EXIT_USAGE
    if args.app and args.redis_manager:
        warn_if_emits_stay_local(sio, store)
    try:
        return build_app(
            sio,
            args.policies,
            socketio_path=args.socketio_path,
            cel_backend=args.cel_backend,
            store=store,
            claims_loader=loader,
            ops_token=os.environ.get("POLICY_ENGINE_OPS_TOKEN") or None,
            candidate=args.candidate,
            watch=args.watch,
        )
    except PolicyError as exc:
        for diagnostic in exc.diagnostics:
            sys.stderr.write(f"{diagnostic}\n")
        sys.stderr.write(f"{len(exc.errors)} error(s) in {args.policies}: not serving\n")
        return EXIT_INVALID
    except PolicyEngineError as exc:  # valid, but cannot be installed (keys, secrets)
        sys.stderr.write(f"{args.policies}: {exc}: not serving\n")
        return EXIT_INVALID


def _validate(
    files: Sequence[str], fmt: str, strict: bool, backend: str | None, out: TextIO
) -> int:
    from policy_engine.compiler.pipeline import compile_file

    results: list[dict[str, object]] = []
    failed_files = 0
    error_count = 0
    for name in files:
        diagnostics: tuple[Diagnostic, ...]
        version = None
        try:
            result = compile_file(name, backend=backend)
            diagnostics = result.warnings
            version = result.policy.version
        except PolicyError as exc:
            diagnostics = exc.diagnostics
        has_error = any(
            d.severity is Severity.ERROR or (strict and d.severity is Severity.WARNING)
            for d in diagnostics
        )
        failed_files += has_error
        error_count += sum(1 for d in diagnostics if d.severity is Severity.ERROR)
        results.append(
            {
                "file": name,
                "valid": not has_error,
                "version": version,
                "diagnostics": [_as_json(d) for d in diagnostics],
            }
        )
        if fmt == "text":
            for diagnostic in diagnostics:
                out.write(f"{diagnostic}\n")
            if not has_error:
                out.write(f"{name}: ok (version {str(version)[:12]})\n")
        elif fmt == "github":
            for diagnostic in diagnostics:
                out.write(_as_github(diagnostic) + "\n")
    if fmt == "json":
        json.dump({"valid": not failed_files, "files": results}, out, indent=2)
        out.write("\n")
    elif fmt == "text" and failed_files:
        out.write(f"{error_count} error(s) in {failed_files} file(s)\n")
    return EXIT_INVALID if failed_files else EXIT_OK


def _hooks() -> list[Hook]:
    return list(Hook)


def _explain(args: argparse.Namespace, out: TextIO) -> int:
    import asyncio

    from policy_engine.compiler.pipeline import compile_file
    from policy_engine.core.engine import Engine
    from policy_engine.core.explain import ContextError, build_context, run_hook

    policies, hook, fmt, backend = args.policies, args.hook, args.format, args.cel_backend
    try:
        raw = json.loads(args.context)
    except json.JSONDecodeError as exc:
        sys.stderr.write(f"--context is not JSON: {exc}\n")
        return EXIT_USAGE
    if not isinstance(raw, dict):
        sys.stderr.write("--context must be a JSON object of variables\n")
        return EXIT_USAGE
    try:
        policy = compile_file(policies, backend=backend).policy
    except PolicyError as exc:
        out.write(f"{exc}\n")
        return EXIT_INVALID
    try:
        contexts = build_context(raw)
    except ContextError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_USAGE
    decision = asyncio.run(run_hook(Engine(policy), Hook(hook), contexts, explain=True))
    if fmt == "json":
        json.dump(
            {"hook": hook, "policy_version": policy.version, **decision.to_dict()}, out, indent=2
        )
        out.write("\n")
        return EXIT_OK
    out.write(f"hook {hook}: {decision.outcome.value}")
    out.write(f" by {decision.rule}\n" if decision.rule else "\n")
    for entry in decision.trace:
        mark = "x" if entry.matched else " "
        detail = f"  {json.dumps(dict(entry.detail), default=str)}" if entry.detail else ""
        out.write(f"  [{mark}] {entry.section}/{entry.rule}: {entry.outcome}{detail}\n")
    if decision.shadowed:
        out.write(f"  shadow rules that would have refused: {', '.join(decision.shadowed)}\n")
    if decision.payload is not None:
        out.write(f"  client payload: {json.dumps(dict(decision.payload))}\n")
    return EXIT_OK


def _test(paths: Sequence[str], fmt: str, backend: str | None, out: TextIO) -> int:
    from policy_engine.cli.policytest import PolicyTestError, discover, run_file

    files = discover(paths)
    if not files:
        sys.stderr.write("no policy test files found\n")
        return EXIT_USAGE
    results = []
    for file in files:
        try:
            results.extend(run_file(file, backend=backend))
        except (PolicyTestError, PolicyError) as exc:
            sys.stderr.write(f"{exc}\n")
            return EXIT_INVALID
    failed = [r for r in results if not r.passed]
    if fmt == "json":
        json.dump(
            [
                {"file": r.file, "name": r.name, "passed": r.passed, "failures": list(r.failures)}
                for r in results
            ],
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for result in results:
            out.write(f"{'PASS' if result.passed else 'FAIL'} {result.file}: {result.name}\n")
            for failure in result.failures:
                out.write(f"     {failure}\n")
        out.write(f"{len(results) - len(failed)} passed, {len(failed)} failed\n")
    return EXIT_INVALID if failed else EXIT_OK


def _as_json(diagnostic: Diagnostic) -> dict[str, object]:
    location = diagnostic.location
    return {
        "file": location.file,
        "line": location.line,
        "column": location.column,
        "pointer": location.pointer,
        "severity": diagnostic.severity.value,
        "code": diagnostic.code,
        "message": diagnostic.message,
        "hint": diagnostic.hint,
    }


def _as_github(diagnostic: Diagnostic) -> str:
    """A workflow command, so CI shows the problem on the line of the pull request."""
    location = diagnostic.location
    level = "error" if diagnostic.severity is Severity.ERROR else "warning"
    message = diagnostic.message + (f" (hint: {diagnostic.hint})" if diagnostic.hint else "")
    message = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    file = str(Path(location.file))
    return (
        f"::{level} file={file},line={location.line},col={location.column},"
        f"title={diagnostic.code}::{message}"
    )


if __name__ == "__main__":
    entry()
