"""What verifying a token adds to a real Socket.IO connect, per algorithm.

Five servers, each a real uvicorn on its own port pinned to core 0 (the echo benchmark's
server, so the same handlers): bare python-socketio, the policy without an
``authentication`` section, and the same policy whose one provider requires an HS256,
RS256 (2048-bit) or ES256 (P-256) token in the auth payload. From core 1, one client at a
time connects over WebSocket and disconnects again; the latency is from ``connect()``
being called to the namespace being connected, so it holds the handshake, the policy's
connect hook and the one verification a connection gets. Every connect carries a freshly
minted token; the two baselines send none. Each round starts a fresh server per mode and,
after a warm-up, the modes take turns connect by connect (ABCDE, EDCBA, ...): on a shared
machine whose speed drifts by more than a verification costs, a mode measured in a block
of its own would be compared with another moment rather than with the other modes. Each
server's CPU time over the measured connects is reported too: latency on a busy machine
also counts the time a server waits for the core, CPU time only the work it does.

    python -m benchmarks.connect_bench [--rounds 4] [--cycles 300] [--warmup 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import socketio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from benchmarks.decision_bench import summary
from benchmarks.echo_bench import ROOT, free_port, pinned
from policy_engine.cli.token import mint

ISSUER = "connect-bench"
AUDIENCE = "connect-bench"
KID = "bench-1"
SECRET_ENV = "CONNECT_BENCH_HS256_SECRET"

BASE_POLICY = """\
version: 1
identity: {user_claim: sub}
errors:
  - name: auth-failed
    when: error.type == "AuthenticationError"
    category: connection
    code: AUTH_FAILED
    retryable: false
  - name: internal
    when: "true"
    category: system
    code: INTERNAL
    retryable: true
"""

AUTHENTICATION = """\
authentication:
  providers:
    bench:
      issuer: {issuer}
      audiences: [{audience}]
      algorithms: [{algorithm}]
      keys: {keys}
      from: [{{auth: token}}]
  default: {{providers: [bench], require: required}}
"""


@dataclass(frozen=True, slots=True)
class Mode:
    """One server set-up and what its clients send when they connect."""

    name: str
    server_args: tuple[str, ...]
    auth: Callable[[], dict[str, str] | None]


def build_modes(folder: Path) -> list[Mode]:
    """The five modes, their keys and policy files written into ``folder``."""
    base = folder / "no-auth.yaml"
    base.write_text(BASE_POLICY)
    secret = secrets.token_urlsafe(24)  # 32 bytes: the least HS256 accepts
    os.environ[SECRET_ENV] = secret  # the servers inherit it
    hs_key = folder / "hs256.secret"
    hs_key.write_text(secret)
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_private = ec.generate_private_key(ec.SECP256R1())
    keys = {
        "HS256": (hs_key, f"{{env: {SECRET_ENV}, kid: {KID}}}"),
        "RS256": _key_pair(folder, "rs256", rsa_private),
        "ES256": _key_pair(folder, "es256", ec_private),
    }
    modes = [
        Mode("bare", ("--mode", "bare"), lambda: None),
        Mode("no-auth", ("--mode", "policy", "--policies", str(base)), lambda: None),
    ]
    for algorithm, (signing_key, key_source) in keys.items():
        policy = folder / f"{algorithm.lower()}.yaml"
        section = AUTHENTICATION.format(
            issuer=ISSUER, audience=AUDIENCE, algorithm=algorithm, keys=key_source
        )
        policy.write_text(BASE_POLICY + section)
        modes.append(
            Mode(
                algorithm,
                ("--mode", "policy", "--policies", str(policy)),
                _token_maker(signing_key, algorithm),
            )
        )
    return modes


def _key_pair(folder: Path, stem: str, private: Any) -> tuple[Path, str]:
    """Write the private key (for minting) and the public key (for the policy)."""
    private_path = folder / f"{stem}.key.pem"
    private_path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_path = folder / f"{stem}.pub.pem"
    public_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, f'{{pem_file: "{public_path}", kid: {KID}}}'


def _token_maker(key: Path, algorithm: str) -> Callable[[], dict[str, str]]:
    def make() -> dict[str, str]:
        token = mint(
            "user-1", key=key, algorithm=algorithm, kid=KID, issuer=ISSUER, audience=AUDIENCE
        )
        return {"token": token}

    return make


@contextmanager
def server(args: tuple[str, ...]) -> Iterator[tuple[int, int]]:
    """The echo server on a free port, core 0, until the block ends: (port, pid)."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.echo_server", *args, "--port", str(port)]
    process = subprocess.Popen(pinned(0, argv), cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server {args} exited with {process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server {args} did not start") from None
                time.sleep(0.1)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def cpu_ns(pid: int) -> int:
    """Nanoseconds the process's threads have run: finer than the clock ticks of /stat."""
    return sum(
        int(path.read_text().split()[0]) for path in Path(f"/proc/{pid}/task").glob("*/schedstat")
    )


async def connect_once(port: int, mode: Mode) -> float:
    """One connect then disconnect; the connect's latency in microseconds."""
    client = socketio.AsyncClient(reconnection=False)
    auth = mode.auth()
    started = time.perf_counter()
    await client.connect(
        f"http://127.0.0.1:{port}?conversation_id=bench",
        auth=auth,
        transports=["websocket"],
        wait_timeout=10,
    )
    latency = (time.perf_counter() - started) * 1e6
    await client.disconnect()
    return latency


@dataclass
class Samples:
    """One mode's connect latencies (us) per round, and its server's CPU time (us)."""

    rounds: list[list[float]] = field(default_factory=list)
    server_cpu: float = 0.0


async def interleave(
    servers: Mapping[str, tuple[int, int]],
    order: list[Mode],
    cycles: int,
    warmup: int,
    results: Mapping[str, Samples],
) -> None:
    """``cycles`` connects per mode, one mode after another in ``order``, then reversed."""
    for mode in order:
        for _ in range(warmup):
            await connect_once(servers[mode.name][0], mode)
    latencies: dict[str, list[float]] = {mode.name: [] for mode in order}
    cpu_before = {name: cpu_ns(pid) for name, (_, pid) in servers.items()}
    for cycle in range(cycles):
        for mode in order if cycle % 2 == 0 else order[::-1]:
            latencies[mode.name].append(await connect_once(servers[mode.name][0], mode))
    for name, (_, pid) in servers.items():
        results[name].server_cpu += (cpu_ns(pid) - cpu_before[name]) / 1e3
        results[name].rounds.append(latencies[name])


def measure_round(
    order: list[Mode], cycles: int, warmup: int, results: Mapping[str, Samples]
) -> None:
    """One round: a fresh server per mode, all up while their connects take turns."""
    with ExitStack() as stack:
        servers = {mode.name: stack.enter_context(server(mode.server_args)) for mode in order}
        asyncio.run(interleave(servers, order, cycles, warmup, results))


def report(modes: list[Mode], results: Mapping[str, Samples], connects: int) -> None:
    pooled = {name: [s for run in r.rounds for s in run] for name, r in results.items()}
    medians = {name: statistics.median(samples) for name, samples in pooled.items()}
    cpu = {name: r.server_cpu / connects for name, r in results.items()}
    print(
        f"{'mode':<8} {'median':>7} {'p99':>7} {'round medians':>13} {'x bare':>7} "
        f"{'x no-auth':>9} {'paired':>7} {'CPU/conn':>8} {'CPU x no-auth':>13}"
    )
    for mode in modes:
        median, p99 = summary(pooled[mode.name])
        per_round = [statistics.median(run) for run in results[mode.name].rounds]
        spread = f"{min(per_round):.0f}-{max(per_round):.0f}"
        # Each round's median against the no-auth server's in the same round, whose median
        # is steadier than the ratio of medians when the machine's speed drifts.
        paired = statistics.median(
            statistics.median(run) / statistics.median(baseline)
            for run, baseline in zip(
                results[mode.name].rounds, results["no-auth"].rounds, strict=True
            )
        )
        print(
            f"{mode.name:<8} {median:>7.0f} {p99:>7.0f} {spread:>13} "
            f"{median / medians['bare']:>7.3f} {median / medians['no-auth']:>9.3f} "
            f"{paired:>7.3f} {cpu[mode.name]:>8.0f} {cpu[mode.name] / cpu['no-auth']:>13.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the clients' core; the servers get core 0
    with tempfile.TemporaryDirectory(prefix="connect-bench-") as folder:
        modes = build_modes(Path(folder))
        results = {mode.name: Samples() for mode in modes}
        for round_ in range(args.rounds):
            order = modes if round_ % 2 == 0 else modes[::-1]
            measure_round(order, args.cycles, args.warmup, results)
    print(
        f"WebSocket connect latency (us), {args.cycles} connects per mode in each of "
        f"{args.rounds} rounds, modes taking turns ({args.warmup} warm-up each)"
    )
    report(modes, results, args.rounds * args.cycles)
    print("paired: the median over rounds of a round's median over no-auth's in that round")
    print("CPU/conn: the server's CPU time (us) per connect and disconnect, measured cycles")


if __name__ == "__main__":
    main()
