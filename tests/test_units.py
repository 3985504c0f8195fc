from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy_engine.errors import UnitError
from policy_engine.language.units import (
    Rate,
    format_duration,
    parse_duration,
    parse_percent,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("250us", 0.00025),
        ("2d", 172800.0),
        (" 10s ", 10.0),
        ("1.5s", 1.5),
        (3, 3.0),
    ],
)
def test_durations_parse_to_seconds(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "ms", "10 parsecs", "-5s", "5s10", "s5", "1e3s", True])
def test_invalid_durations_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(UnitError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("20/minute", Rate(20, 60.0)),
        ("20/minutes", Rate(20, 60.0)),
        ("10/s", Rate(10, 1.0)),
        ("10/second", Rate(10, 1.0)),
        ("100/10s", Rate(100, 10.0)),
        ("5/hour", Rate(5, 3600.0)),
        ("1 / day", Rate(1, 86400.0)),
    ],
)
def test_rates_parse(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["0/s", "10/0s", "10/fortnight", "ten/s", "10", "10/ms", "/s"])
def test_invalid_rates_are_refused(text: str) -> None:
    with pytest.raises(UnitError):
        parse_rate(text)


def test_rate_interval_is_the_gap_between_evenly_spaced_events() -> None:
    rate = parse_rate("20/minute")
    assert rate.interval == 3.0
    assert rate.per_second == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MB", 1_000_000), ("64KiB", 65_536), ("16kb", 16_000), ("512", 512), (100, 100)],
)
def test_sizes_parse_to_bytes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1TB", "MB", "-1", "1.5.5MB", -3])
def test_invalid_sizes_are_refused(text: str | int) -> None:
    with pytest.raises(UnitError):
        parse_size(text)


@pytest.mark.parametrize(("text", "fraction"), [("50%", 0.5), ("0%", 0.0), ("100%", 1.0)])
def test_percentages_parse_to_fractions(text: str, fraction: float) -> None:
    assert parse_percent(text) == fraction


@pytest.mark.parametrize("text", ["101%", "50", "half", "-1%"])
def test_invalid_percentages_are_refused(text: str) -> None:
    with pytest.raises(UnitError):
        parse_percent(text)


_UNITS = st.sampled_from(["ms", "s", "m", "h", "d"])
_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.lists(st.tuples(st.integers(0, 10_000), _UNITS), min_size=1, max_size=4))
def test_a_compound_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    assert parse_duration(text) == pytest.approx(sum(n * _FACTORS[u] for n, u in parts))


@given(st.integers(1, 10**6), st.integers(1, 10**5))
def test_format_duration_round_trips_whole_milliseconds(count: int, divisor: int) -> None:
    seconds = round(count / divisor, 3) or 0.001
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-9)


@given(st.integers(1, 10**9), st.sampled_from(["s", "second", "minute", "hour", "day", "10s"]))
def test_rates_keep_their_count_and_period(count: int, period: str) -> None:
    rate = parse_rate(f"{count}/{period}")
    assert rate.limit == count
    assert rate.period * count == pytest.approx(rate.interval * count * count)


@given(st.text(max_size=20))
def test_unit_parsers_raise_only_unit_errors(text: str) -> None:
    for parse in (parse_duration, parse_rate, parse_size, parse_percent):
        with contextlib.suppress(UnitError):  # anything else escapes and fails the test
            parse(text)
