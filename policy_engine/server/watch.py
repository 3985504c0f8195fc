"""``serve --watch``: reload when a policy file, or an event schema it names, changes.

For where SIGHUP is awkward: a Kubernetes ConfigMap mounted as a volume is updated by
writing the new files into a fresh directory and swapping the ``..data`` symlink to it,
so the path the server reads never changes and no event on it fires in place. Polling
each file's resolved path and its inode, size and modification time sees that swap, an
edit in place and a rename over the file alike, with no platform-specific notification
API. A change is acted on once the files have stayed the same for ``debounce`` seconds
(an editor or ``kubectl`` writes in several steps), and then goes through the reloader's
own request, the same atomic path as SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from policy_engine.language.model import PolicySet

Fingerprint = tuple[tuple[str, str, int, int, int], ...]


def watched_files(path: str | Path, policy: PolicySet) -> list[Path]:
    """The policy file and every event schema file it names (relative to it)."""
    base = Path(path).parent
    files = [Path(path)]
    for spec in (*policy.events.values(), policy.default_event):
        if spec.schema_path:
            files.append(base / spec.schema_path)
    return files


def fingerprint(files: Iterable[Path]) -> Fingerprint:
    """What identifies each file's content: where it resolves to, inode, size, mtime."""
    marks = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            marks.append((str(file), "", 0, -1, 0))
            continue
        resolved = os.path.realpath(file)
        marks.append((str(file), resolved, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(marks)


class Watcher:
    """Polls the files ``files()`` names every ``interval`` seconds; calls ``on_change``
    once they changed and then stayed the same for ``debounce`` seconds."""

    def __init__(
        self,
        files: Callable[[], list[Path]],
        on_change: Callable[[], None],
        *,
        interval: float = 0.5,
        debounce: float = 1.0,
    ) -> None:
        self.files = files
        self.on_change = on_change
        self.interval = interval
        self.debounce = debounce
        self.changes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        seen = fingerprint(self.files())
        pending: Fingerprint | None = None
        since = 0.0
        while True:
            await asyncio.sleep(self.interval)
            now = fingerprint(self.files())
            if now != (pending if pending is not None else seen):
                pending, since = now, loop.time()  # changed (again): wait until it settles
                continue
            if pending is not None and loop.time() - since >= self.debounce:
                seen, pending = pending, None
                self.changes += 1
                self.on_change()
