"""The Redis store at 100,000 connections: memory, throughput and lease costs, no sockets.

One machine here cannot hold 100,000 Socket.IO connections (2 cores, 20,000 file
descriptors), but Redis can be given the state of that many. This benchmark drives
:class:`~policy_engine.state.redis_store.RedisStore` directly, as ``--processes`` server
processes would: each store is one simulated process with its own Redis connection,
pipeline and lease (its own process id). They run in this one Python process, so the
ops/s are what one Python client on this shared machine reaches; the Redis CPU per
operation (``INFO cpu``, main thread) is what extrapolates to Redis's own ceiling.

Phases, in order, each against a Redis the benchmark starts on a free loopback port:

1. **opens**: ``--connections`` connections counted by ``open_connection`` (connection
   ``i`` on store ``i % processes``; ``--users`` users, ``--ips`` client addresses, the
   ceilings of ``--max-total``, ``--max-per-user``, ``--max-per-ip``), ``--in-flight``
   calls at once across the stores;
2. **renewal**: one store's ``renew()`` at that size (nothing to reap), repeated;
3. **reaping a dead process**: one more store (lease 1 s) counts ``--dead-connections``
   connections, stops without giving them back (its renewals cancelled, no release: a
   crash), and one ``renew()`` of a live store after its lease ran out reaps it;
4. **limit checks**: ``--decisions`` checks for each of ``--conversations`` conversations
   of the shipped ``user-actions-per-conversation`` rule (a sliding log, 600/minute), then
   the same with GCRA; the GCRA variant counts 600 per day, since at 600/minute a key
   lives 100 ms after its last decision and none would be left to weigh (a key's size does
   not depend on its rate);
5. **actions**: ``--actions`` times what an ``oh_user_action`` asks the store under the
   shipped policy, in turn: the per-conversation limit, the ``agent-runtime`` breaker's
   permit and the call's outcome (3 scripts). Then one sliding log filled to its 600
   entries, the rule's worst case;
6. **closes**: the connections of every store but the first closed one by one, then the
   first store's ``close()``, which gives its connections back in one script.

"Round trips per op" counts the pipelines the stores sent: every call waits for one, and
calls made at about the same time share it.

The live stores hold leases of ``--live-lease`` seconds (an hour by default) so that their
background renewals, which reap too, cannot take the dead process before the timed call.
``RedisStore`` exposes neither its pipeline's counters, its lease, nor a way to stop
without releasing; the benchmark reaches into ``_pipeline``, ``_connections`` and
``_renewing`` for them.

    python -m benchmarks.lease_bench [--connections 100000] [--processes 10]

Needs ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from benchmarks.decision_bench import SHIPPED
from benchmarks.store_bench import redis_server
from policy_engine.compiler.pipeline import compile_file
from policy_engine.language.model import CircuitBreakerSpec, RateAlgorithm, RateLimitSpec
from policy_engine.language.units import Rate
from policy_engine.state.protocol import ConnectionLimits
from policy_engine.state.redis_store import RedisStore

PREFIX = "policy-engine"
CONVERSATION_RULE = "user-actions-per-conversation"
BREAKER = "agent-runtime"


@dataclass(frozen=True)
class Snapshot:
    """Redis's and this process's counters at one instant."""

    used_memory: int
    keys: int
    redis_cpu: float  # seconds, Redis's main thread
    script_usec: int  # server time spent in EVALSHA
    script_calls: int
    client_cpu: float  # seconds, this process
    batches: int  # pipelines sent by every store together
    calls: int  # script calls in them
    wall: float


@dataclass(frozen=True)
class Phase:
    """What one phase cost: the difference between two snapshots, over ``ops`` operations."""

    name: str
    ops: int
    before: Snapshot
    after: Snapshot

    @property
    def seconds(self) -> float:
        return self.after.wall - self.before.wall

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def per_op_us(self, field: str) -> float:
        delta = getattr(self.after, field) - getattr(self.before, field)
        return float(delta) * 1e6 / self.ops

    @property
    def memory(self) -> int:
        return self.after.used_memory - self.before.used_memory

    @property
    def new_keys(self) -> int:
        return self.after.keys - self.before.keys

    @property
    def round_trips(self) -> float:
        return (self.after.batches - self.before.batches) / self.ops

    @property
    def calls_per_op(self) -> float:
        return (self.after.calls - self.before.calls) / self.ops

    @property
    def calls_per_batch(self) -> float:
        batches = self.after.batches - self.before.batches
        return (self.after.calls - self.before.calls) / batches if batches else 0.0


class Bench:
    """The Redis, the simulated processes' stores, and the counters read around each phase."""

    def __init__(self, url: str, admin: Redis, stores: list[RedisStore]) -> None:
        self.url = url
        self.admin = admin
        self.stores = stores

    async def snapshot(self) -> Snapshot:
        memory = await self.admin.info("memory")
        cpu = await self.admin.info("cpu")
        commands = await self.admin.info("commandstats")
        evalsha = commands.get("cmdstat_evalsha", {"usec": 0, "calls": 0})
        user = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
        system = cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
        pipelines = [store._pipeline for store in self.stores]
        return Snapshot(
            used_memory=int(memory["used_memory"]),
            keys=int(await self.admin.dbsize()),
            redis_cpu=float(user) + float(system),
            script_usec=int(evalsha["usec"]),
            script_calls=int(evalsha["calls"]),
            client_cpu=time.process_time(),
            batches=sum(p.batches for p in pipelines),
            calls=sum(p.calls for p in pipelines),
            wall=time.perf_counter(),
        )

    async def phase(self, name: str, ops: int, work: Awaitable[object]) -> Phase:
        before = await self.snapshot()
        await work
        return Phase(name, ops, before, await self.snapshot())

    async def counter(self, name: str) -> int:
        return int(await self.admin.get(f"{PREFIX}:conn:{name}") or 0)


async def in_flight(count: int, width: int, op: Callable[[int], Awaitable[object]]) -> None:
    """Run ``op(0) .. op(count - 1)``, ``width`` at a time (each worker takes the next)."""
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:
            await op(index)

    await asyncio.gather(*(worker() for _ in range(min(width, count))))


def address(index: int) -> str:
    """A distinct IPv4 address per index, in 198.18.0.0/15 (benchmarking)."""
    return f"198.{18 + index // 65536}.{index // 256 % 256}.{index % 256}"


@dataclass(frozen=True)
class Population:
    """Who connection ``i`` is: its user, its address, the ceilings it is counted against."""

    users: int
    ips: int
    max_total: int
    max_per_user: int
    max_per_ip: int

    def user(self, index: int) -> str:
        return f"u{index % self.users}"

    def ip(self, index: int) -> str:
        return address(index % self.ips)

    def limits(self, index: int, user: str | None = None) -> ConnectionLimits:
        return ConnectionLimits(
            user or self.user(index),
            self.ip(index),
            self.max_total,
            self.max_per_user,
            self.max_per_ip,
        )


async def open_all(
    bench: Bench, population: Population, connections: int, width: int, refused: list[str]
) -> None:
    stores = bench.stores

    async def open_one(index: int) -> None:
        ceiling = await stores[index % len(stores)].open_connection(population.limits(index))
        if ceiling is not None:
            refused.append(ceiling)

    await in_flight(connections, width, open_one)


async def server_time(bench: Bench, call: Callable[[], Awaitable[object]]) -> tuple[float, int]:
    """Wall time of one script call (us) and Redis's own time running it (us)."""
    before = await bench.snapshot()
    started = time.perf_counter()
    await call()
    wall = (time.perf_counter() - started) * 1e6
    after = await bench.snapshot()
    return wall, after.script_usec - before.script_usec


async def renewals(bench: Bench, times: int) -> tuple[list[float], list[int]]:
    leases = bench.stores[0]._connections
    walls, servers = [], []
    for _ in range(times):
        wall, server = await server_time(bench, leases.renew)
        walls.append(wall)
        servers.append(server)
    return walls, servers


@dataclass(frozen=True)
class Reaping:
    opens: Phase
    wall_us: float
    server_us: int
    fields: int
    reaped: bool
    total_after: int


async def reap_dead_process(
    bench: Bench, population: Population, connections: int, width: int
) -> Reaping:
    """A process counts ``connections``, dies without giving them back, and is reaped."""
    dying = RedisStore(bench.url, prefix=PREFIX, lease_ttl=1.0)
    bench.stores.append(dying)  # its pipeline counted in the snapshots while it lives
    process_id = dying._connections.process_id
    refused: list[str] = []

    async def open_one(index: int) -> None:
        ceiling = await dying.open_connection(population.limits(index, f"gone{index}"))
        if ceiling is not None:
            refused.append(ceiling)

    opens = await bench.phase(
        "opens, one process", connections, in_flight(connections, width, open_one)
    )
    if refused:
        raise SystemExit(f"the dying process was refused {len(refused)} connections")
    fields = int(await bench.admin.hlen(f"{PREFIX}:conn:proc:{process_id}"))
    # A crash: the renewals stop and nothing is given back.
    renewing, dying._renewing = dying._renewing, None
    if renewing is not None:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
    await dying.close()  # with no renewal running, this only closes its Redis connection
    bench.stores.remove(dying)
    await asyncio.sleep(1.5)  # its lease (1 s, on Redis's clock) runs out
    leases = f"{PREFIX}:conn:leases"
    if await bench.admin.zscore(leases, process_id) is None:
        raise SystemExit("the dead process was reaped before the timed renewal")
    wall, server = await server_time(bench, bench.stores[0]._connections.renew)
    reaped = await bench.admin.zscore(leases, process_id) is None
    return Reaping(opens, wall, server, fields, reaped, await bench.counter("total"))


@dataclass(frozen=True)
class LimitRun:
    label: str
    phase: Phase
    refused: int
    sample_key_bytes: int


async def check_limits(
    bench: Bench, spec: RateLimitSpec, label: str, *, conversations: int, decisions: int, width: int
) -> LimitRun:
    stores = bench.stores
    checks = [
        [(spec, f"u{index}:c{index}")] for index in range(conversations)
    ]  # conn.user_id + ":" + conn.conversation_id, one user per conversation
    refused = 0

    async def check_one(index: int) -> None:
        nonlocal refused
        store = stores[index % len(stores)]
        decision = await store.check_rate_limits(checks[index % conversations], time.time())
        refused += not decision.allowed

    total = conversations * decisions
    phase = await bench.phase(label, total, in_flight(total, width, check_one))
    sample = stores[0]._limits.key(spec, "u0:c0")
    sample_bytes = int(await bench.admin.memory_usage(sample, samples=0) or 0)
    await drop(bench.admin, f"{PREFIX}:rl:{spec.name}:*")
    return LimitRun(label, phase, refused, sample_bytes)


async def drop(admin: Redis, pattern: str) -> None:
    batch: list[Any] = []
    async for key in admin.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) == 1000:
            await admin.unlink(*batch)
            batch = []
    if batch:
        await admin.unlink(*batch)


@dataclass(frozen=True)
class Actions:
    phase: Phase
    refused: int


async def act(
    bench: Bench, sliding: RateLimitSpec, breaker: CircuitBreakerSpec, *, actions: int, width: int
) -> Actions:
    """What the store does for one ``oh_user_action`` under the shipped policy: the
    per-conversation limit, then the breaker's permit and the call's outcome, in turn."""
    stores = bench.stores
    refused = 0

    async def one(index: int) -> None:
        nonlocal refused
        store = stores[index % len(stores)]
        decision = await store.check_rate_limits([(sliding, f"a{index}:c{index}")], time.time())
        permit = await store.breaker_acquire(breaker, time.time())
        if permit.permitted:
            await store.breaker_record(breaker, time.time(), failed=False, duration=0.01)
        refused += not (decision.allowed and permit.permitted)

    phase = await bench.phase("actions", actions, in_flight(actions, width, one))
    await drop(bench.admin, f"{PREFIX}:rl:{sliding.name}:*")
    return Actions(phase, refused)


async def saturated_log(bench: Bench, spec: RateLimitSpec) -> tuple[int, int]:
    """Bytes of one sliding log at its longest: ``limit`` admissions within the period."""
    store = bench.stores[0]
    checks = [(spec, "saturated:c0")]
    for _ in range(spec.rate.limit):
        await store.check_rate_limits(checks, time.time())
    key = store._limits.key(spec, "saturated:c0")
    length = int(await bench.admin.llen(key))
    if length != spec.rate.limit:
        raise SystemExit(f"the sliding log holds {length} entries, not {spec.rate.limit}")
    size = int(await bench.admin.memory_usage(key, samples=0) or 0)
    await bench.admin.unlink(key)
    return length, size


async def close_each(bench: Bench, population: Population, closing: list[int], width: int) -> None:
    """Close the connections ``closing`` one by one, each on the store that opened it."""
    stores = bench.stores

    async def close_one(position: int) -> None:
        index = closing[position]
        await stores[index % len(stores)].close_connection(
            population.user(index), population.ip(index)
        )

    await in_flight(len(closing), width, close_one)


def shipped_specs() -> tuple[RateLimitSpec, RateLimitSpec, CircuitBreakerSpec]:
    """The shipped per-conversation limit, its GCRA variant, and the shipped breaker."""
    policy = compile_file(SHIPPED).policy
    (sliding,) = [rule for rule in policy.rate_limits if rule.name == CONVERSATION_RULE]
    (breaker,) = [rule for rule in policy.circuit_breakers if rule.name == BREAKER]
    gcra = dataclasses.replace(
        sliding,
        name=f"{CONVERSATION_RULE}-gcra",
        algorithm=RateAlgorithm.GCRA,
        rate=Rate(sliding.rate.limit, 86_400.0),
        burst=sliding.rate.limit,
    )
    return sliding, gcra, breaker


def kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


def mib(value: float) -> str:
    return f"{value / 1024 / 1024:,.1f} MiB"


def row(name: str, value: str, note: str = "") -> None:
    print(f"| {name} | {value} | {note} |")


def phase_rows(phase: Phase, in_flight_width: int, *, keyed: int | None = None) -> None:
    row(
        f"{phase.name}: ops/s",
        f"{phase.rate:,.0f}",
        f"{phase.ops:,} ops in {phase.seconds:.1f} s, {in_flight_width} in flight",
    )
    row(f"{phase.name}: Redis CPU per op", f"{phase.per_op_us('redis_cpu'):.1f} us", "main thread")
    script_calls = phase.after.script_calls - phase.before.script_calls
    if script_calls:
        usec = phase.after.script_usec - phase.before.script_usec
        row(f"{phase.name}: Redis time per script", f"{usec / script_calls:.1f} us", "EVALSHA")
    row(
        f"{phase.name}: client CPU per op",
        f"{phase.per_op_us('client_cpu'):.1f} us",
        "this process",
    )
    row(
        f"{phase.name}: round trips per op",
        f"{phase.round_trips:.3f}",
        f"pipelines sent; {phase.calls_per_op:.2f} script calls per op, "
        f"{phase.calls_per_batch:.1f} per pipeline",
    )
    if keyed is not None:
        per = phase.memory / keyed if keyed else 0.0
        row(
            f"{phase.name}: Redis memory",
            f"{mib(phase.memory)}",
            f"{per:,.0f} B per {'connection' if 'open' in phase.name else 'key'} ({keyed:,})",
        )


@dataclass(frozen=True)
class Counted:
    """The connections phase: the opens, and what the counts weigh afterwards."""

    opens: Phase
    counted: int
    hash_bytes: int
    user_bytes: int


@dataclass(frozen=True)
class Closed:
    """The closes one by one, then the first process's close() giving back the rest."""

    closes: Phase
    kept: int
    release_wall_us: float
    release_server_us: int
    left: int


@dataclass(frozen=True)
class Results:
    counted: Counted
    renew_walls: list[float]
    renew_servers: list[int]
    reaping: Reaping
    limit_runs: list[LimitRun]
    actions: Actions
    saturated: tuple[int, int]  # a sliding log's entries at its longest, and its bytes
    closed: Closed
    elapsed: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    redis_version: str


async def count_connections(bench: Bench, population: Population, args: Any) -> Counted:
    refused: list[str] = []
    opens = await bench.phase(
        "opens",
        args.connections,
        open_all(bench, population, args.connections, args.in_flight, refused),
    )
    if refused:
        raise SystemExit(f"{len(refused)} connections refused ({sorted(set(refused))})")
    first_hash = f"{PREFIX}:conn:proc:{bench.stores[0]._connections.process_id}"
    return Counted(
        opens,
        await bench.counter("total"),
        int(await bench.admin.memory_usage(first_hash, samples=0) or 0),
        int(await bench.admin.memory_usage(f"{PREFIX}:conn:user:u0", samples=0) or 0),
    )


async def close_connections(bench: Bench, population: Population, args: Any) -> Closed:
    stores = bench.stores
    closing = [index for index in range(args.connections) if index % len(stores)]
    closes = await bench.phase(
        "closes", len(closing), close_each(bench, population, closing, args.in_flight)
    )
    wall, server = await server_time(bench, stores[0].close)
    left = await bench.counter("total")
    for store in stores[1:]:
        await store.close()
    return Closed(closes, args.connections - len(closing), wall, server, left)


async def warm_up(
    bench: Bench, population: Population, specs: list[RateLimitSpec], breaker: CircuitBreakerSpec
) -> None:
    """Load every script and start each process's lease, then leave no key behind but the
    breaker's (one hash, as in any deployment)."""
    for index, store in enumerate(bench.stores):
        await store.open_connection(population.limits(index, f"warm{index}"))
        await store.close_connection(f"warm{index}", population.ip(index))
        for spec in specs:
            await store.check_rate_limits([(spec, f"warm:{index}")], time.time())
        await store.breaker_acquire(breaker, time.time())
        await store.breaker_record(breaker, time.time(), failed=False, duration=0.01)
    await drop(bench.admin, f"{PREFIX}:rl:*")


async def measure(args: Any, url: str) -> Results:
    population = Population(
        args.users or args.connections,
        args.ips,
        args.max_total,
        args.max_per_user,
        args.max_per_ip,
    )
    admin = Redis.from_url(url)
    stores = [
        RedisStore(url, prefix=PREFIX, lease_ttl=args.live_lease) for _ in range(args.processes)
    ]
    bench = Bench(url, admin, stores)
    sliding, gcra, breaker = shipped_specs()
    await warm_up(bench, population, [sliding, gcra], breaker)
    load_before = os.getloadavg()
    started = time.perf_counter()
    counted = await count_connections(bench, population, args)
    renew_walls, renew_servers = await renewals(bench, args.renewals)
    reaping = await reap_dead_process(bench, population, args.dead_connections, args.in_flight)
    limit_runs = [
        await check_limits(
            bench,
            spec,
            label,
            conversations=args.conversations,
            decisions=args.decisions,
            width=args.in_flight,
        )
        for spec, label in ((sliding, "sliding-log checks"), (gcra, "GCRA checks"))
    ]
    actions = await act(bench, sliding, breaker, actions=args.actions, width=args.in_flight)
    saturated = await saturated_log(bench, sliding)
    closed = await close_connections(bench, population, args)
    elapsed = time.perf_counter() - started
    version = str((await admin.info("server"))["redis_version"])
    await admin.aclose()
    return Results(
        counted,
        renew_walls,
        renew_servers,
        reaping,
        limit_runs,
        actions,
        saturated,
        closed,
        elapsed,
        load_before,
        os.getloadavg(),
        version,
    )


def report(args: Any, results: Results) -> None:
    each = args.connections // args.processes
    print(
        f"{args.connections:,} connections on {args.processes} simulated processes "
        f"({each:,} each), {args.users or args.connections:,} users, {args.ips:,} addresses; "
        f"{args.conversations:,} conversations x {args.decisions} decisions; "
        f"{args.in_flight} calls in flight; Redis {results.redis_version}; "
        f"{results.elapsed:.0f} s in all"
    )
    print(
        "load average before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
            *results.load_before, *results.load_after
        )
    )
    print()
    print("| measure | value | note |")
    print("| --- | --- | --- |")
    counted = results.counted
    phase_rows(counted.opens, args.in_flight, keyed=args.connections)
    row("connections counted after the opens", f"{counted.counted:,}", f"of {args.connections:,}")
    row("one process's lease hash", kib(counted.hash_bytes), f"MEMORY USAGE, {each:,} connections")
    row("one user's counter", f"{counted.user_bytes} B", "MEMORY USAGE")
    walls, servers = results.renew_walls, results.renew_servers
    row(
        "renew(), nothing to reap",
        f"{statistics.median(walls):.0f} us",
        f"median of {len(walls)}, max {max(walls):.0f} us; Redis {statistics.median(servers)} us",
    )
    reaping = results.reaping
    phase_rows(reaping.opens, args.in_flight, keyed=args.dead_connections)
    row(
        f"renew() reaping a dead process of {args.dead_connections:,}",
        f"{reaping.wall_us / 1000:.1f} ms",
        f"Redis {reaping.server_us / 1000:.1f} ms for {reaping.fields:,} hash fields; "
        f"reaped: {reaping.reaped}; total after: {reaping.total_after:,}",
    )
    for limit_run in results.limit_runs:
        phase_rows(limit_run.phase, args.in_flight, keyed=limit_run.phase.new_keys)
        row(
            f"{limit_run.label}: refused",
            f"{limit_run.refused:,}",
            f"one key {limit_run.sample_key_bytes} B (MEMORY USAGE, {args.decisions} decisions)",
        )
    phase_rows(results.actions.phase, args.in_flight)
    row("actions: refused", f"{results.actions.refused:,}", "by the limit or the breaker")
    row(
        f"sliding log of {results.saturated[0]} entries",
        kib(results.saturated[1]),
        "MEMORY USAGE: the rule's worst case",
    )
    closed = results.closed
    phase_rows(closed.closes, args.in_flight)
    row(
        f"close() of a process holding {closed.kept:,}",
        f"{closed.release_wall_us / 1000:.1f} ms",
        f"Redis {closed.release_server_us / 1000:.1f} ms (gives back its counts); "
        f"total after: {closed.left:,}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--users", type=int, default=0, help="default: one per connection")
    parser.add_argument("--ips", type=int, default=5_000)
    parser.add_argument("--max-total", type=int, default=120_000)
    parser.add_argument("--max-per-user", type=int, default=5)
    parser.add_argument("--max-per-ip", type=int, default=50)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=2, help="per conversation")
    parser.add_argument("--actions", type=int, default=50_000, help="limit + breaker each")
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--renewals", type=int, default=21)
    parser.add_argument("--dead-connections", type=int, default=10_000)
    parser.add_argument("--live-lease", type=float, default=3_600.0)
    args = parser.parse_args()
    with redis_server() as url:
        results = asyncio.run(measure(args, url))
    report(args, results)


if __name__ == "__main__":
    main()
