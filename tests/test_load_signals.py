"""The smoothed load signals and ``load.overloaded``: what a stall, a sustained lag and a
quiet spell do to them, the ``load`` section that configures them, and a live server
publishing them."""

from __future__ import annotations

import pytest
import yaml
from servers import WAIT, echo_app
from test_load import MINIMAL, FakeClock, FixedProbe

from policy_engine.cli.main import main
from policy_engine.compiler.pipeline import compile_file, compile_text
from policy_engine.core.engine import Engine
from policy_engine.errors import PolicyError
from policy_engine.language.model import LoadSpec, OverloadSpec, ThresholdSpec
from policy_engine.observe.composite import CompositeObserver
from policy_engine.server.sampler import EventCounter, LoadSampler

SHIPPED = MINIMAL.parent.parent / "policies.yaml"
INTERVAL = 0.5  # the sampler's default

SECTION = """\
version: 1
load:
  window: 10s
  overloaded:
    loop_lag_avg_ms: {{enter: 1000, exit: 250}}
    min_hold: {hold}
"""


class Run:
    """A sampler on a fake clock, fed the worst lag of each sample as the loop would be."""

    def __init__(self, hold: str = "10s") -> None:
        policy = compile_text(SECTION.format(hold=hold)).policy
        self.clock = FakeClock()
        self.sampler = LoadSampler(
            Engine(policy), lambda: 0, process=FixedProbe(), clock=self.clock
        )

    def lag(self, lag_ms: int, seconds: float) -> list[dict[str, int]]:
        """``seconds`` of samples whose worst lag is ``lag_ms``; each covers at least its lag."""
        samples = []
        end = self.clock.now + seconds
        step = max(INTERVAL, lag_ms / 1000)
        while self.clock.now < end:
            self.clock.now += step
            samples.append(self.sampler.sample(lag_ms / 1000, self.clock.now))
        return samples


def overloaded(samples: list[dict[str, int]]) -> list[bool]:
    return [bool(sample["overloaded"]) for sample in samples]


def test_a_single_stall_does_not_flip_overloaded() -> None:
    run = Run()
    run.lag(2, 10)

    stall = run.lag(2500, 2.5)  # one stall, 2.5 s long: a GC pause or a burst of handshakes
    after = run.lag(2, 30)

    assert stall[0]["loop_lag_ms"] == 2500  # the raw signal an old rule fired on
    assert max(s["loop_lag_avg_ms"] for s in stall + after) < 1000
    assert not any(overloaded(stall + after))


def test_a_sustained_lag_flips_overloaded_once_the_average_crosses_enter() -> None:
    run = Run()
    run.lag(2, 10)

    sustained = run.lag(1500, 30)

    flags = overloaded(sustained)
    assert not flags[0]  # the first late sample alone is not overload
    assert flags[-1]
    first = flags.index(True)
    assert all(flags[first:])
    assert sustained[first]["loop_lag_avg_ms"] > 1000 >= sustained[first - 1]["loop_lag_avg_ms"]


def test_leaving_needs_the_exit_threshold_not_just_below_enter() -> None:
    run = Run()
    run.lag(3000, 30)

    between = run.lag(600, 60)  # below enter (1000), above exit (250), long past the hold

    assert all(250 < s["loop_lag_avg_ms"] < 1000 for s in between[-10:])
    assert all(overloaded(between))
    quiet = run.lag(2, 60)
    assert overloaded(quiet)[-1] is False
    left = overloaded(quiet).index(False)
    assert quiet[left]["loop_lag_avg_ms"] <= 250 < quiet[left - 1]["loop_lag_avg_ms"]


def test_leaving_needs_the_minimum_hold_too() -> None:
    run = Run(hold="60s")
    while not run.lag(3000, 3)[-1]["overloaded"]:
        assert run.clock.now < 60, "a sustained 3 s lag never made the server overloaded"
    entered_at = run.clock.now

    quiet: list[tuple[float, dict[str, int]]] = []
    while run.clock.now < entered_at + 90:
        (sample,) = run.lag(2, INTERVAL)
        quiet.append((run.clock.now, sample))

    below_exit = [t for t, s in quiet if s["loop_lag_avg_ms"] <= 250]
    assert below_exit[0] < entered_at + 60  # the average was down well before the hold ended
    assert all(s["overloaded"] for t, s in quiet if t < entered_at + 60)
    assert not quiet[-1][1]["overloaded"]


def test_rates_are_smoothed_the_same_way() -> None:
    clock = FakeClock()
    counter = EventCounter()
    sampler = LoadSampler(
        Engine(compile_file(MINIMAL).policy),
        lambda: 0,
        connects=counter,
        process=FixedProbe(),
        clock=clock,
    )
    clock.now = 1.0
    sampler.sample(0.0, clock.now)  # the first sample sets the averages: nothing
    counter.connects += 500  # one burst of handshakes within one sample
    clock.now += INTERVAL
    burst = sampler.sample(0.0, clock.now)

    assert burst["connects_per_second"] == 1000
    assert 0 < burst["connects_per_second_avg"] < 100


def test_a_reload_applies_new_thresholds_and_keeps_the_averages() -> None:
    run = Run()
    run.lag(600, 20)
    assert not run.sampler.engine.load["overloaded"]
    average = run.sampler.engine.load["loop_lag_avg_ms"]
    lower = SECTION.format(hold="10s").replace("enter: 1000", "enter: 400")
    run.sampler.engine.swap(compile_text(lower).policy)

    (sample,) = run.lag(600, INTERVAL)

    assert sample["overloaded"]
    assert sample["loop_lag_avg_ms"] >= average


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\n", LoadSpec()),
        (
            "version: 1\nload:\n  window: 30s\n  overloaded:\n"
            "    connects_per_second_avg: {enter: 900, exit: 300}\n    min_hold: 1m\n",
            LoadSpec(
                window=30.0,
                overloaded=OverloadSpec(
                    loop_lag_avg_ms=None,  # left out of a written block: not considered
                    connects_per_second_avg=ThresholdSpec(enter=900, exit=300),
                    min_hold=60.0,
                ),
            ),
        ),
    ],
)
def test_the_load_section_compiles_to_its_spec(text: str, expected: LoadSpec) -> None:
    assert compile_text(text).policy.load == expected


def test_a_bad_load_section_is_refused_with_its_place_and_a_hint() -> None:
    text = "version: 1\nload:\n  overloaded:\n    loop_lag_avg_ms: {enter: 100, exit: 300}\n"

    with pytest.raises(PolicyError) as caught:
        compile_text(text, "policy.yaml")

    (diagnostic,) = caught.value.diagnostics
    assert str(diagnostic).startswith("policy.yaml:4:41: error: exit (300) is above enter (100)")
    assert "set exit at or below enter" in diagnostic.hint


def test_the_shipped_policy_validates_and_sheds_on_the_smoothed_signals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", str(SHIPPED)]) == 0
    assert "ok" in capsys.readouterr().out
    shedding = yaml.safe_load(SHIPPED.read_text())["shedding"]
    for rule in shedding:
        assert "loop_lag_ms" not in rule["when"], rule["name"]  # the raw, single-sample lag
    assert (
        "load.overloaded" in next(r for r in shedding if r["name"] == "overloaded-connect")["when"]
    )


def test_the_shipped_thresholds_have_hysteresis() -> None:
    shipped = compile_file(SHIPPED).policy.load
    assert shipped.overloaded.thresholds()
    for _, threshold in shipped.overloaded.thresholds():
        assert threshold.exit < threshold.enter
    assert shipped.overloaded.min_hold > 0


async def test_a_live_server_publishes_the_smoothed_signals(serve, clients) -> None:
    served = serve(setup=echo_app)
    counter = EventCounter()
    # What build_app wires: the connects the adapter judges are counted for the sampler.
    served.adapter.observer = CompositeObserver(served.observer, counter)
    clock = FakeClock()
    sampler = LoadSampler(served.engine, served.adapter, connects=counter, clock=clock)
    for n in range(4):
        client, _ = await clients.connect(served.url, query={"conversation_id": f"c{n}"})
    await client.call("echo", 1, timeout=WAIT)
    clock.now = 1.0

    sample = sampler.sample(0.0, clock.now)

    assert counter.connects == 4
    assert sample["connects_per_second"] == 4
    assert sample["events_per_second"] == 1
    assert sample["active_connections"] == 4
    assert sample["overloaded"] is False
    assert served.engine.load is sample
