"""``policy-engine replay``: what a candidate policy would change in recorded decisions.

Reads decision logs (:mod:`policy_engine.observe.decision_log`), judges each decision again
under the candidate (:func:`policy_engine.core.rejudge.rejudge_all`) and reports the
changes: counts by kind, rule and verdicts, a few examples of each, as text or JSON. With
``--max-changed`` it is a CI gate: exit 1 when more decisions would change than allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.rejudge import KINDS, Changes, Judgement, rejudge_all
from policy_engine.errors import PolicyError
from policy_engine.observe.decision_log import read_judgements

_TITLES = {
    "allowed_to_refused": "allowed -> refused",
    "refused_to_allowed": "refused -> allowed",
    "code_changed": "code changed",
}


class Threshold:
    """``--max-changed``: a share of the judged decisions (``1%``) or a count (``25``)."""

    def __init__(self, text: str) -> None:
        self.text = text.strip()
        try:
            if self.text.endswith("%"):
                self.fraction: float | None = float(self.text[:-1]) / 100
                self.count: int | None = None
            else:
                self.fraction, self.count = None, int(self.text)
        except ValueError:
            raise ValueError(f"{text!r}: expected a percentage (1%) or a count (25)") from None

    def exceeded(self, changes: Changes) -> bool:
        if self.fraction is not None:
            return changes.changed_fraction > self.fraction
        return self.count is not None and changes.changed > self.count


def run(args: argparse.Namespace, out: TextIO) -> int:
    """0: within ``--max-changed`` (or none given); 1: over it or an invalid candidate;
    2: a log cannot be read."""
    try:
        threshold = Threshold(args.max_changed) if args.max_changed is not None else None
    except ValueError as exc:
        sys.stderr.write(f"policy-engine replay: --max-changed {exc}\n")
        return 2
    try:
        policy = compile_file(args.policies, backend=args.cel_backend).policy
    except PolicyError as exc:
        for diagnostic in exc.diagnostics:
            sys.stderr.write(f"{diagnostic}\n")
        return 1
    paths = [Path(log) for log in args.logs]
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    progress = Progress(sum(_size(p) for p in paths), sys.stderr if show else None)
    try:
        changes = asyncio.run(
            rejudge_all(policy, _judgements(paths, progress), examples=args.examples)
        )
    except (OSError, ValueError) as exc:
        progress.done()
        sys.stderr.write(f"policy-engine replay: {exc}\n")
        return 2
    progress.done()
    failed = threshold is not None and threshold.exceeded(changes)
    if args.json:
        report = {
            "candidate": {"path": args.policies, "version": policy.version},
            **changes.to_dict(),
            "max_changed": threshold.text if threshold is not None else None,
            "passed": not failed,
        }
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        _write_text(changes, args.policies, policy.version, threshold, failed, out)
    return 1 if failed else 0


def _judgements(paths: Sequence[Path], progress: Progress) -> Iterator[Judgement]:
    for path in paths:
        with path.open(encoding="utf-8") as lines:

            def counted(lines: TextIO = lines) -> Iterator[str]:
                for line in lines:
                    progress.advance(len(line))
                    yield line

            try:
                yield from read_judgements(counted())
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None


def _write_text(  # noqa: PLR0917 (one report, every part of it)
    changes: Changes,
    path: str,
    version: str,
    threshold: Threshold | None,
    failed: bool,
    out: TextIO,
) -> None:
    out.write(
        f"replayed {changes.judged:,} decisions under {path} (version {version}): "
        f"{changes.changed:,} would change ({changes.changed_fraction:.2%})"
        + (f", {changes.skipped:,} not judged again (circuit breakers)" if changes.skipped else "")
        + "\n"
    )
    for kind in KINDS:
        out.write(f"  {_TITLES[kind]}: {changes.by_kind[kind]:,}\n")
    if changes.counts:
        out.write("\nby rule:\n")
        for row in changes.to_dict()["by_rule"]:
            out.write(
                f"  {_TITLES[row['kind']]:<19} {row['rule']:<40} "
                f"{row['from']} -> {row['to']}  {row['count']:,}\n"
            )
    for kind in KINDS:
        samples = changes.samples[kind]
        if samples:
            out.write(f"\nexamples, {_TITLES[kind]}:\n")
            for change in samples:
                c = change.to_dict()
                what = f"event {c['event']}" if c["event"] else c["hook"]
                out.write(
                    f"  {what} sid={c['sid']} user={c['user_id'] or '-'}: "
                    f"{c['from']} -> {c['to']} ({c['rule']})"
                    + (f" correlation_id={c['correlation_id']}" if c["correlation_id"] else "")
                    + "\n"
                )
    if threshold is not None:
        verdict = "over" if failed else "within"
        out.write(f"\n{verdict} --max-changed {threshold.text}\n")


class Progress:
    """A progress bar over the bytes read, redrawn at most ten times a second."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.read = 0
        self._drawn = 0.0

    def advance(self, size: int) -> None:
        self.read += size
        if self.stream is None:
            return
        now = time.monotonic()
        if now - self._drawn >= 0.1:
            self._drawn = now
            self._draw()

    def _draw(self) -> None:
        assert self.stream is not None
        share = min(self.read / self.total, 1.0)
        bar = "#" * int(share * 30)
        self.stream.write(f"\rreplaying [{bar:<30}] {share:4.0%}")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.read = self.total
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
