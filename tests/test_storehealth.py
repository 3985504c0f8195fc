"""The shared store's health: every failure counted, each change told once."""

from __future__ import annotations

from policy_engine.state.health import StoreHealth


def test_listeners_hear_each_change_once_and_failures_are_all_counted() -> None:
    health = StoreHealth()
    heard: list[tuple[bool, str]] = []
    health.listeners.append(lambda available, detail: heard.append((available, detail)))

    health.answered()
    for _ in range(3):
        health.failed(TimeoutError("no answer"))
    health.answered()
    health.answered()
    health.failed(ConnectionError("refused"))

    assert heard == [
        (False, "TimeoutError('no answer')"),
        (True, ""),
        (False, "ConnectionError('refused')"),
    ]
    assert health.failures == 4
    assert health.available is False


def test_a_failing_listener_does_not_stop_the_others() -> None:
    health = StoreHealth()
    heard: list[bool] = []

    def broken(available: bool, detail: str) -> None:
        raise RuntimeError("listener bug")

    health.listeners += [broken, lambda available, detail: heard.append(available)]
    health.failed(OSError("gone"))
    health.answered()

    assert heard == [False, True]
