"""``serve --watch``: a real ``policy-engine serve`` process whose policy is mounted as a
Kubernetes ConfigMap is: files reached through the ``..data`` symlink, updated by writing
a new directory and swapping the symlink atomically. SIGHUP reloads the candidate too."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import WAIT, ServeProcess

from policy_engine.compiler.pipeline import compile_file

POLICY = """\
version: 1
events:
  oh_user_action:
    schema: events/oh_user_action.json
rate_limits:
  - name: actions
    hook: event
    when: event.name == "oh_user_action"
    key: conn.sid
    limit: RATE
"""
CANDIDATE = POLICY.replace("RATE", "1/s")
SCHEMA = {"type": "object", "required": ["action"]}


class ConfigMap:
    """A directory laid out as the kubelet lays out a mounted ConfigMap."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0

    def publish(self, files: dict[str, str]) -> None:
        """Write ``files`` into a fresh directory, then point ``..data`` at it atomically."""
        self.generation += 1
        target = self.root / f"..2026_12_02_{self.generation:02d}"
        for name, text in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(text, encoding="utf-8")
        staging = self.root / "..data_tmp"
        staging.symlink_to(target.name)
        os.replace(staging, self.root / "..data")  # rename(2): the swap is atomic
        for name in ("policies.yaml", "candidate.yaml", "events"):
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")


def files(rate: str, schema: dict[str, Any]) -> dict[str, str]:
    return {
        "policies.yaml": POLICY.replace("RATE", rate),
        "candidate.yaml": CANDIDATE,
        "events/oh_user_action.json": json.dumps(schema),
    }


def status(process: ServeProcess) -> Any:
    with urllib.request.urlopen(f"{process.ops_url}/status", timeout=5) as response:
        return json.load(response)


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServeProcess, ConfigMap]]:
    config = ConfigMap(tmp_path / "config")
    config.root.mkdir()
    config.publish(files("10/s", SCHEMA))
    process = ServeProcess("watched", tmp_path, config.root / "policies.yaml", "memory")
    process.start("--watch", "--candidate", str(config.root / "candidate.yaml"))
    try:
        process.wait_until_ready()
        yield process, config
    finally:
        process.stop()


@pytest.mark.slow
def test_a_configmap_symlink_swap_reloads_the_policy_once_and_sighup_the_candidate(
    served: tuple[ServeProcess, ConfigMap],
) -> None:
    process, config = served
    first = status(process)
    assert first["reloads"]["succeeded"] == 0
    assert first["candidate"]["reloads"]["succeeded"] == 0

    config.publish(files("20/s", SCHEMA))
    expected = compile_file(config.root / "policies.yaml").policy.version
    assert expected != first["policy"]["version"]
    wait_for(lambda: status(process)["policy"]["version"] == expected, "the swapped policy")
    time.sleep(1.5)  # longer than the debounce: a second reload would have run by now
    assert status(process)["reloads"]["succeeded"] == 1

    # Only the event schema the policy names changes: that is a change too.
    config.publish(files("20/s", {**SCHEMA, "required": ["action", "args"]}))
    wait_for(lambda: status(process)["reloads"]["succeeded"] == 2, "the schema's reload")
    assert status(process)["reloads"]["failed"] == 0

    # SIGHUP reloads the candidate file as well as the policy.
    before = status(process)["candidate"]["reloads"]["succeeded"]
    assert process.popen is not None
    process.popen.send_signal(signal.SIGHUP)
    wait_for(
        lambda: status(process)["candidate"]["reloads"]["succeeded"] == before + 1,
        "the candidate's reload on SIGHUP",
    )
