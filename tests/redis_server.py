"""Throwaway Redis servers for the tests: free loopback ports, no persistence.

:class:`RedisServer` starts ``redis-server`` as a subprocess and waits until it answers
``PING``; :meth:`RedisServer.stop` and :meth:`RedisServer.start` again on the same port
play an outage and a recovery, :meth:`RedisServer.pause` and :meth:`RedisServer.resume` a
server that hangs. :class:`ClusterServers` is a Redis Cluster of three masters made by
``redis-cli --cluster create``; :class:`SentinelServers` a master, its replica and one
Sentinel watching them, whose :meth:`SentinelServers.failover` promotes the replica.
Never the machine's default Redis on 6379.

Without ``redis-server`` on ``PATH`` the tests that need one are skipped, unless
``POLICY_ENGINE_REQUIRE_REDIS=1`` (as CI sets it), which makes them fail instead.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import redis
from tools import required_tool

WAIT = 10.0  # generous ceiling for a local redis-server to start or stop


def redis_server_binary() -> str:
    """The redis-server to run; skips the test (or fails it, when required) without one."""
    return required_tool("redis-server", "REDIS", "redis-server is not on PATH")


def redis_cli_binary() -> str:
    """The redis-cli that builds clusters; skips (or fails, when required) without one."""
    return required_tool("redis-cli", "REDIS", "redis-cli is not on PATH")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server on 127.0.0.1; ``url`` stays the same across stop and start."""

    def __init__(
        self,
        directory: Path,
        binary: str | None = None,
        *,
        options: Sequence[str] = (),
        config: str | None = None,
    ) -> None:
        """``options`` are more ``--name value`` arguments; ``config`` the text of a
        configuration file to start from (``--port`` and the rest still apply after it)."""
        self.binary = binary or redis_server_binary()
        self.directory = directory
        self.port = free_port()
        self.options = list(options)
        self.config = config
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
        command = [self.binary]
        if self.config is not None:
            config = self.directory / "redis.conf"
            config.write_text(self.config)
            command.append(str(config))
        command += [
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
            *self.options,
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

    def client(self) -> redis.Redis:
        """A plain synchronous client of this server, for the tests' own checks."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=WAIT)


@contextlib.contextmanager
def started(servers: Sequence[RedisServer]) -> Iterator[None]:
    """Start every server; stop every one that started if one of them fails, and after."""
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds, for at most ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.02)


CLUSTER_OPTIONS = ("--cluster-replicas", "0", "--cluster-yes")

QUICK_REPLICATION = (
    # Replicas sync at once rather than after the default 5 s wait for company, and a
    # master stops at once rather than wait up to 10 s for its replicas to catch up.
    *("--repl-diskless-sync-delay", "0"),
    *("--shutdown-timeout", "0"),
)


class ClusterServers:
    """A Redis Cluster of three masters on loopback ports, and a replica of the first one
    if asked: :meth:`take_over` then stops that master and has the replica take its slots.

    ``url`` is the store's ``redis+cluster://`` URL naming the three masters. Use
    :meth:`running` as a context manager: the cluster is made on entry (``redis-cli
    --cluster create``, then waited on until every node says ``cluster_state:ok``) and its
    servers stopped on exit.
    """

    def __init__(self, directory: Path, *, replica: bool = False) -> None:
        binary = redis_server_binary()
        self.cli = redis_cli_binary()
        self.nodes = [_cluster_node(directory / f"node{n}", binary) for n in range(3)]
        self.replica = _cluster_node(directory / "replica", binary) if replica else None

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    @contextlib.contextmanager
    def running(self) -> Iterator[ClusterServers]:
        everyone = [*self.nodes, *([self.replica] if self.replica else [])]
        with started(everyone):
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [self.cli, "--cluster", "create", *addresses, *CLUSTER_OPTIONS],
                check=True,
                capture_output=True,
                timeout=WAIT * 3,
            )
            if self.replica is not None:
                self._replicate(self.replica, self.nodes[0], everyone)
            for node in everyone:
                wait_for(lambda node=node: self.is_ok(node), f"cluster_state:ok on {node.port}")
            yield self

    def take_over(self) -> None:
        """Stop the first master; its replica takes its slots (``CLUSTER FAILOVER
        TAKEOVER``, no vote) and its place in ``nodes``."""
        replica = self.replica
        assert replica is not None, "made without a replica"
        self.nodes[0].stop()
        with replica.client() as client:
            client.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        self.nodes[0], self.replica = replica, None
        for node in self.nodes:
            wait_for(lambda node=node: self._serves_alone(node), f"the takeover on {node.port}")

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    @staticmethod
    def is_ok(node: RedisServer) -> bool:
        """Whether ``node`` says the cluster is ok (every slot served)."""
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def _serves_alone(self, node: RedisServer) -> bool:
        """Whether ``node`` says the cluster is ok and its masters are ``nodes``."""
        with node.client() as client:
            shards = client.execute_command("CLUSTER", "SLOTS")
        masters = {int(shard[2][1]) for shard in shards}
        return self.is_ok(node) and masters == {n.port for n in self.nodes}

    @staticmethod
    def _replicate(
        replica: RedisServer, master: RedisServer, everyone: Sequence[RedisServer]
    ) -> None:
        bus = _option(master, "--cluster-port")
        with master.client() as client:
            master_id = client.execute_command("CLUSTER", "MYID").decode()
        with replica.client() as client:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", master.port, bus)
            wait_for(
                lambda: master_id.encode() in client.execute_command("CLUSTER", "NODES"),
                "the replica to meet the cluster",
            )
            client.execute_command("CLUSTER", "REPLICATE", master_id)
        wait_for(lambda: _linked(replica), "the replica to sync")
        # Every node must know the replica, or hear of its takeover only by gossip, later.
        for node in everyone:
            wait_for(lambda node=node: _knows_all(node, len(everyone)), "the cluster's links")


def _cluster_node(directory: Path, binary: str) -> RedisServer:
    return RedisServer(
        directory,
        binary,
        options=[
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            # The bus port, port + 10000 by default, may be taken or past 65535.
            *("--cluster-port", str(free_port())),
            *QUICK_REPLICATION,
        ],
    )


def _knows_all(node: RedisServer, count: int) -> bool:
    """Whether ``node`` has a live link to each of the ``count`` nodes (itself included)."""
    with node.client() as client:
        lines = client.execute_command("CLUSTER", "NODES").decode().splitlines()
    return len(lines) == count and all(" connected" in line for line in lines)


def _option(server: RedisServer, name: str) -> str:
    return server.options[server.options.index(name) + 1]


def _linked(replica: RedisServer) -> bool:
    """Whether ``replica`` is a replica in sync with its master."""
    with replica.client() as client:
        info = client.info("replication")
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


class SentinelServers:
    """A master, one replica of it and one Sentinel watching them (quorum 1).

    ``url`` is the store's ``redis+sentinel://`` URL for the service ``name``. Use it as a
    context manager; :meth:`failover` asks the Sentinel to promote the replica and waits
    until it names the new master and the old one follows it.
    """

    name = "policy-engine-test"

    def __init__(self, directory: Path) -> None:
        binary = redis_server_binary()
        self.master = RedisServer(directory / "master", binary, options=QUICK_REPLICATION)
        follow = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica = RedisServer(
            directory / "replica", binary, options=[*QUICK_REPLICATION, *follow]
        )
        self.sentinel = RedisServer(directory / "sentinel", binary)
        self.sentinel.options = ["--sentinel"]
        self.sentinel.config = (
            f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 1000\n"
            f"sentinel failover-timeout {self.name} 5000\n"
        )

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.name}/0"

    @contextlib.contextmanager
    def running(self) -> Iterator[SentinelServers]:
        with started([self.master, self.replica]):
            wait_for(lambda: _linked(self.replica), "the replica to sync")
            with started([self.sentinel]):
                wait_for(self._replica_known, "the sentinel to see the replica")
                yield self

    def master_port(self) -> int:
        with self.sentinel.client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(port)

    def failover(self) -> None:
        """Promote the replica; the servers swap roles (``master`` is the new master).

        The Sentinel turns the old master into a replica of the new one at its next look
        at it (up to 10 s); the old master is told at once here, as the Sentinel would
        tell it, so that it refuses writes from then on.
        """
        with self.master.client() as client:
            client.execute_command("WAIT", 1, int(WAIT * 1000))  # nothing written is lost
        with self.sentinel.client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.name)
        wait_for(lambda: self.master_port() == self.replica.port, "the sentinel to switch")
        self.master, self.replica = self.replica, self.master
        with self.replica.client() as client:
            client.execute_command("REPLICAOF", "127.0.0.1", self.master.port)
        wait_for(lambda: _linked(self.replica), "the old master to follow the new")

    def _replica_known(self) -> bool:
        with self.sentinel.client() as client:
            replicas = client.sentinel_slaves(self.name)
        return any(
            replica["port"] == self.replica.port
            and replica["master-link-status"] == "ok"
            and not (replica["is_disconnected"] or replica["is_sdown"])
            for replica in replicas
        )
