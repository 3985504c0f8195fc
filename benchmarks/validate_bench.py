"""Validating a generated 1,000-rule policy against parsing the same file with PyYAML alone.

Target: `compile_file` (load with positions, schema, semantics, CEL) takes at most 3x the
time `yaml.safe_load` needs for the same text, measured in the same run.

    python -m benchmarks.validate_bench [--rules 1000] [--repeat 5] [--backend NAME]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from policy_engine.compiler.pipeline import compile_file


def generate_policy(rules: int) -> str:
    """A policy whose rules are spread over every section, as a large real policy would be."""
    lines = ["version: 1", "errors:"]
    per_section = rules // 4
    for i in range(per_section):
        lines += [
            f"  - name: error-{i}",
            f'    when: error.type == "Error{i}" || error.status == {400 + i % 100}',
            "    category: system",
            "    severity: error",
            f"    code: E{i}",
            "    message: Something failed.",
            "    retryable: true",
            "    backoff: default",
        ]
    lines.append("rate_limits:")
    for i in range(per_section):
        lines += [
            f"  - name: limit-{i}",
            "    hook: event",
            f'    when: event.name == "event_{i}"',
            '    key: conn.user_id + ":" + conn.conversation_id',
            f"    limit: {10 + i}/second",
            "    burst: 5",
        ]
    lines.append("shedding:")
    for i in range(per_section):
        lines += [
            f"  - name: shed-{i}",
            "    hook: connect",
            f"    when: load.loop_lag_ms > {100 + i} || load.active_connections > {1000 + i}",
            "    action: reject",
            "    retry_after: 5s",
        ]
    lines += ["authorization:", "  rules:"]
    for i in range(rules - 3 * per_section):
        lines += [
            f"    - name: authz-{i}",
            "      hook: event",
            f'      when: event.name == "admin_{i}" && !("admin" in conn.headers)',
            "      effect: deny",
        ]
    return "\n".join(lines) + "\n"


def best_of(repeat: int, action: Callable[[], object]) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "policy.yaml"
        text = generate_policy(args.rules)
        path.write_text(text)
        compile_file(path, backend=args.backend)  # warm caches (schema, CEL environments)
        yaml_best, yaml_median = best_of(args.repeat, lambda: yaml.safe_load(path.read_text()))
        ours_best, ours_median = best_of(
            args.repeat, lambda: compile_file(path, backend=args.backend)
        )
    lines = text.count("\n")
    print(f"policy: {args.rules} rules, {lines} lines, {len(text)} bytes")
    print(f"yaml.safe_load:   best {yaml_best * 1e3:8.1f} ms  median {yaml_median * 1e3:8.1f} ms")
    print(f"compile_file:     best {ours_best * 1e3:8.1f} ms  median {ours_median * 1e3:8.1f} ms")
    print(f"ratio (median):   {ours_median / yaml_median:.2f}x  (target <= 3x)")


if __name__ == "__main__":
    main()
