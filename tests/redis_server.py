"""A throwaway redis-server for the tests: its own free loopback port, no persistence.

:class:`RedisServer` starts ``redis-server`` as a subprocess and waits until it answers
``PING``; :meth:`RedisServer.stop` and :meth:`RedisServer.start` again on the same port
play an outage and a recovery, :meth:`RedisServer.pause` and :meth:`RedisServer.resume` a
server that hangs. Never the machine's default Redis on 6379.

Without ``redis-server`` on ``PATH`` the tests that need one are skipped, unless
``POLICY_ENGINE_REQUIRE_REDIS=1`` (as CI sets it), which makes them fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

WAIT = 10.0  # generous ceiling for a local redis-server to start or stop


def redis_server_binary() -> str:
    """The redis-server to run; skips the test (or fails it, when required) without one."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not on PATH"
        if os.environ.get("POLICY_ENGINE_REQUIRE_REDIS") == "1":
            pytest.fail(f"{message}, and POLICY_ENGINE_REQUIRE_REDIS=1")
        pytest.skip(message)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server on 127.0.0.1; ``url`` stays the same across stop and start."""

    def __init__(self, directory: Path, binary: str | None = None) -> None:
        self.binary = binary or redis_server_binary()
        self.directory = directory
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(log),
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + WAIT
        while not self.answers():
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode() if self._process.stderr else ""
                log_text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"redis-server exited:\n{stderr}{log_text}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)
        if process.stderr is not None:
            process.stderr.close()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def answers(self) -> bool:
        """Whether the server replies ``+PONG`` to ``PING`` right now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        """Empty every database (``FLUSHALL``), between tests sharing the server."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL answered {reply!r}")
