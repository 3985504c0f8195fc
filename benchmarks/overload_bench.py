"""Does load shedding refuse what bare python-socketio serves? Idle and churn storms.

Two servers, each a fresh uvicorn (wsproto) on its own port pinned to core 0, the echo
benchmark's server: bare python-socketio, and the same app behind a policy (the shipped
one by default) exactly as ``policy-engine serve`` runs it. From core 1, plain
socket.io-client in Node (``overload_clients.mjs``) runs each workload against each mode,
the modes alternating run by run (bare first, then policy first, ...):

* idle N: N connections opened at once, as fast as the client can;
* churn C: C connect / echo / disconnect cycles, 10 in parallel.

Reported per run: connections served, refused by code (``OVERLOADED`` is load shedding),
and the policy's connect time (median, and the whole workload's wall time) as a ratio of
bare's in the same round. The policy gets one change, ``identity.trusted_proxies`` set to
loopback, and every client sends its own ``X-Forwarded-For``: per-IP limits then see many
clients, as behind a proxy, and only shedding is left to refuse a storm of one machine.

    python -m benchmarks.overload_bench [--idle 1000 5000] [--churn 5000] [--rounds 2]
                                        [--policies FILE]

Target: the policy serves every connection bare serves (0 shed), connect time <= 1.15x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.echo_bench import ROOT, pinned, server

SHIPPED = ROOT / "policies" / "policies.yaml"
CLIENTS = Path(__file__).resolve().parent / "overload_clients.mjs"
MODES = ("bare", "policy")


@contextmanager
def behind_proxy(policies: Path) -> Iterator[Path]:
    """The policy with loopback trusted as a proxy, next to the original (relative paths)."""
    text = policies.read_text()
    trusted = text.replace("trusted_proxies: []", "trusted_proxies: [127.0.0.1/32]", 1)
    if trusted == text:
        raise SystemExit(f"{policies}: no `trusted_proxies: []` line to replace")
    with tempfile.NamedTemporaryFile(
        "w", dir=policies.parent, prefix=".overload-bench-", suffix=".yaml"
    ) as copy:
        copy.write(trusted)
        copy.flush()
        yield Path(copy.name)


def run(mode: str, policies: Path, workload: Sequence[str]) -> dict[str, Any]:
    with server(mode, "--policies", str(policies), start_within=30) as (port, _):
        time.sleep(1.0)  # let start-up settle (the sampler's first samples, imports)
        argv = ["node", str(CLIENTS), workload[0], f"http://127.0.0.1:{port}", *workload[1:]]
        result = subprocess.run(
            pinned(1, argv), cwd=ROOT, capture_output=True, text=True, check=True, timeout=600
        )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def workload_runs(name: str, workload: Sequence[str], policies: Path, rounds: int) -> None:
    """Runs one workload ``rounds`` times per mode, alternating, and prints every run."""
    p50_ratios: list[float] = []
    wall_ratios: list[float] = []
    for index in range(rounds):
        order = MODES if index % 2 == 0 else MODES[::-1]
        results = {mode: run(mode, policies, workload) for mode in order}
        for mode in order:
            r = results[mode]
            refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or "-"
            print(
                f"{name:<12} {index + 1:>5} {mode:<7} {r['served']:>7} "
                f"{r['refused'].get('OVERLOADED', 0):>5} {refused:<28} "
                f"{r['connect_p50_ms']:>8.1f} {r['connect_p99_ms']:>8.1f} {r['wall_ms']:>9.0f}",
                flush=True,
            )
        bare, policy = results["bare"], results["policy"]
        p50_ratios.append(policy["connect_p50_ms"] / max(bare["connect_p50_ms"], 1e-9))
        wall_ratios.append(policy["wall_ms"] / max(bare["wall_ms"], 1e-9))
    print(
        f"{name:<12} policy/bare: connect p50 {spread(p50_ratios)}, "
        f"wall time {spread(wall_ratios)}  (median (min-max) over {rounds} rounds)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--churn", type=int, nargs="*", default=[5000])
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--policies", type=Path, default=SHIPPED)
    args = parser.parse_args()
    print(f"policy: {args.policies}; {args.rounds} alternating rounds per workload")
    print(
        f"{'workload':<12} {'round':>5} {'mode':<7} {'served':>7} {'shed':>5} "
        f"{'refused by code':<28} {'p50 ms':>8} {'p99 ms':>8} {'wall ms':>9}"
    )
    with behind_proxy(args.policies.resolve()) as policies:
        for count in args.idle:
            workload_runs(f"idle {count}", ["idle", str(count)], policies, args.rounds)
        for cycles in args.churn:
            churn = ["churn", str(cycles), str(args.parallel)]
            workload_runs(f"churn {cycles}", churn, policies, args.rounds)


if __name__ == "__main__":
    main()
