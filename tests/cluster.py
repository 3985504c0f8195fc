"""A deployment on one machine for the tests: ``policy-engine serve`` processes and HAProxy.

:class:`ServeProcess` runs the real command on a free loopback port (and an operations
port) and waits until it answers ``/readyz``; :class:`HAProxy` runs ``haproxy`` on the
shipped ``deploy/haproxy.cfg``, its addresses given through the environment as the file
expects. Both are always stopped by :meth:`stop`, whatever state they are in.

Without ``haproxy`` on ``PATH`` the tests that need it are skipped, unless
``POLICY_ENGINE_REQUIRE_HAPROXY=1`` (as CI sets it), which makes them fail instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from redis_server import free_port
from tools import required_tool

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"
WAIT = 20.0  # generous ceiling for a process to start answering on a busy machine


def haproxy_binary() -> str:
    """The haproxy to run; skips the test (or fails it, when required) without one."""
    # Debian installs it in /usr/sbin, which an ordinary user's PATH may not include.
    return required_tool("haproxy", "HAPROXY", "haproxy is not installed", path="/usr/sbin")


def answers(url: str) -> int:
    """The HTTP status ``url`` answers now (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


class Process:
    """A subprocess whose output goes to a log file, stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        with self.log.open("wb") as output:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def wait_until_answering(self, url: str) -> None:
        deadline = time.monotonic() + WAIT
        while answers(url) != 200:
            if self.popen is None or self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer {url}:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM); :meth:`stop` waits for it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()

    def stop(self) -> None:
        popen, self.popen = self.popen, None
        if popen is None:
            return
        if popen.poll() is None:
            popen.terminate()
        try:
            popen.wait(WAIT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(WAIT)


def stop_all(processes: Sequence[Process]) -> None:
    """Stop every process, their graceful shutdowns running at the same time."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


class ServeProcess(Process):
    """``policy-engine serve`` (the demo app) on 127.0.0.1, on free ports."""

    def __init__(self, name: str, directory: Path, policies: Path, store: str) -> None:
        super().__init__(name, directory / f"{name}.log")
        self.policies = policies
        self.store = store
        self.port = free_port()
        self.ops_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    def start(self, *options: str) -> None:
        self.spawn(
            [
                sys.executable,
                "-c",
                "from policy_engine.cli.main import entry; entry()",
                "serve",
                "--policies",
                str(self.policies),
                "--store",
                self.store,
                "--port",
                str(self.port),
                "--ops-port",
                str(self.ops_port),
                "--log-format",
                "json",
                "--log-level",
                "warning",
                "--graceful-timeout",
                "1",
                *options,
            ]
        )

    def wait_until_ready(self) -> None:
        self.wait_until_answering(f"{self.url}/readyz")


class HAProxy(Process):
    """HAProxy on the shipped configuration, in front of ``backends``."""

    def __init__(self, directory: Path, backends: Sequence[ServeProcess]) -> None:
        super().__init__("haproxy", directory / "haproxy.log")
        self.binary = haproxy_binary()
        self.port = free_port()
        self.backends = backends

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: Path = HAPROXY_CONFIG) -> None:
        addresses = {
            f"POLICY_ENGINE_APP{index}": f"127.0.0.1:{backend.port}"
            for index, backend in enumerate(self.backends, start=1)
        }
        # -db: in the foreground, so that stop() ends HAProxy itself.
        self.spawn(
            [self.binary, "-db", "-f", str(config)],
            env={"POLICY_ENGINE_LISTEN": f"127.0.0.1:{self.port}", **addresses},
        )
        self.wait_until_answering(f"{self.url}/readyz")
