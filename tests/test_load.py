from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from servers import WAIT, echo_app
from structlog.testing import capture_logs

from policy_engine.compiler.pipeline import compile_file
from policy_engine.core.decision import ALLOW
from policy_engine.core.engine import Engine
from policy_engine.server.sampler import ConnectionSource, EventCounter, LoadSampler, ProcessProbe

MINIMAL = Path(__file__).resolve().parent.parent / "policies" / "examples" / "minimal.yaml"


class FakeAdapter:
    def __init__(self, connections: int = 3, *, fail: bool = False) -> None:
        self.connections = connections
        self.fail = fail
        self.shed_ticks = 0
        self.events = 0

    def active_connections(self) -> int:
        return self.connections

    def events_received(self) -> int:
        return self.events

    async def shed_tick(self) -> int:
        self.shed_ticks += 1
        if self.fail:
            raise RuntimeError("shedding broke")
        return 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FixedProbe(ProcessProbe):
    def __init__(self) -> None:
        super().__init__(use_psutil=False)

    def sample(self) -> tuple[int, int]:
        return 64, 5


EngineFactory = Callable[[], Engine]


@pytest.fixture(scope="module")
def engine_factory() -> EngineFactory:
    policy = compile_file(MINIMAL).policy
    return lambda: Engine(policy)


async def wait_for_samples(samples: list[Mapping[str, int]], count: int) -> None:
    for _ in range(1000):
        if len(samples) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {len(samples)} samples taken")


async def test_lag_of_a_blocked_loop_is_observed_and_shed_tick_called(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory()
    adapter = FakeAdapter(connections=3)
    samples: list[Mapping[str, int]] = []
    sampler = LoadSampler(engine, adapter, interval=0.1, on_sample=[samples.append])
    sampler.start()
    try:
        await wait_for_samples(samples, 1)
        taken = len(samples)
        time.sleep(0.3)  # block the event loop on purpose
        await wait_for_samples(samples, taken + 2)
    finally:
        await sampler.stop()

    assert max(sample["loop_lag_ms"] for sample in samples[taken:]) >= 200
    assert adapter.shed_ticks >= len(samples) - 1 >= 1
    assert engine.load["active_connections"] == 3
    assert not sampler.running


def test_each_sample_is_a_new_dict_with_every_load_field(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    clock = FakeClock()
    sampler = LoadSampler(engine, lambda: 7, process=FixedProbe(), clock=clock)
    first = engine.load
    clock.now = 1.0

    sample = sampler.sample(0.002, clock.now)

    assert engine.load is sample
    assert engine.load is not first
    assert sample == {
        "active_connections": 7,
        "loop_lag_ms": 2,
        "events_per_second": 0,
        "memory_mb": 64,
        "cpu_percent": 5,
        "overloaded_ms": 0,
        "connects_per_second": 0,
        "loop_lag_avg_ms": 2,
        "events_per_second_avg": 0,
        "connects_per_second_avg": 0,
        "overloaded": False,
    }
    assert set(sample) == set(first)
    assert type(sample.pop("overloaded")) is bool
    assert all(type(value) is int for value in sample.values())


def test_events_per_second_comes_from_the_counter(engine_factory: EngineFactory) -> None:
    clock = FakeClock()
    events = EventCounter()
    sampler = LoadSampler(
        engine_factory(), lambda: 0, events=events, process=FixedProbe(), clock=clock
    )
    for _ in range(10):
        events.count_event()
    for _ in range(10):
        events.decision("event", ALLOW, 0.0, None)
    events.decision("connect", ALLOW, 0.0, None)
    clock.now = 2.0

    assert sampler.sample(0.0, clock.now)["events_per_second"] == 10

    clock.now = 3.0
    assert sampler.sample(0.0, clock.now)["events_per_second"] == 0


def test_events_per_second_comes_from_the_adapter_when_no_counter_is_given(
    engine_factory: EngineFactory,
) -> None:
    clock = FakeClock()
    adapter = FakeAdapter()
    sampler = LoadSampler(engine_factory(), adapter, process=FixedProbe(), clock=clock)
    adapter.events = 30
    clock.now = 2.0

    assert sampler.sample(0.0, clock.now)["events_per_second"] == 15


async def test_a_live_adapter_counts_the_events_its_clients_send(serve, clients) -> None:
    served = serve(setup=echo_app)
    client, _ = await clients.connect(served.url, query={"conversation_id": "c1"})
    for n in range(5):
        await client.call("echo", n, timeout=WAIT)

    assert served.adapter.events_received() == 5


def test_overloaded_ms_is_how_long_lag_stayed_above_the_threshold(
    engine_factory: EngineFactory,
) -> None:
    sampler = LoadSampler(
        engine_factory(), lambda: 0, lag_threshold_ms=100, process=FixedProbe(), clock=FakeClock()
    )

    assert sampler.sample(0.05, 10.0)["overloaded_ms"] == 0
    assert sampler.sample(0.15, 10.5)["overloaded_ms"] == 150
    assert sampler.sample(0.2, 11.0)["overloaded_ms"] == 650
    assert sampler.sample(0.01, 11.5)["overloaded_ms"] == 0
    assert sampler.sample(0.3, 12.0)["overloaded_ms"] == 300


async def test_a_callable_source_is_sampled_without_shedding(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory()
    samples: list[Mapping[str, int]] = []
    sampler = LoadSampler(
        engine, lambda: 4, interval=0.02, process=FixedProbe(), on_sample=[samples.append]
    )
    sampler.start()
    try:
        await wait_for_samples(samples, 2)
    finally:
        await sampler.stop()

    assert engine.load["active_connections"] == 4
    assert isinstance(FakeAdapter(), ConnectionSource)
    assert not isinstance(lambda: 0, ConnectionSource)


@pytest.mark.parametrize("use_psutil", [True, False])
def test_process_probe_reports_memory_and_cpu(use_psutil: bool) -> None:
    probe = ProcessProbe(use_psutil=use_psutil)
    sum(i * i for i in range(100_000))  # some CPU between the baseline and the sample

    memory_mb, cpu_percent = probe.sample()

    assert probe.uses_psutil is use_psutil
    assert memory_mb > 0
    assert cpu_percent >= 0


async def test_a_failing_shed_tick_is_logged_and_sampling_goes_on(
    engine_factory: EngineFactory,
) -> None:
    adapter = FakeAdapter(fail=True)
    samples: list[Mapping[str, int]] = []
    sampler = LoadSampler(
        engine_factory(), adapter, interval=0.02, process=FixedProbe(), on_sample=[samples.append]
    )
    with capture_logs() as logs:
        sampler.start()
        sampler.start()  # a second start is a no-op
        try:
            await wait_for_samples(samples, 3)
            assert sampler.running
        finally:
            await sampler.stop()

    assert adapter.shed_ticks >= 2
    assert any(entry["event"] == "load.shed_failed" for entry in logs)


def test_interval_must_be_positive(engine_factory: EngineFactory) -> None:
    with pytest.raises(ValueError, match="positive"):
        LoadSampler(engine_factory(), lambda: 0, interval=0)
