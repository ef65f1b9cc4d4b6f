"""StoreRunner's quick calls in worker threads: the brief blocking wait and its fallback to trio.

A task started with ``start_soon`` runs only when the caller passes through
trio's scheduler, so whether it ran shows which way a result travelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import trio

from borgstorefs.workers import StoreRunner


def sleeper(seconds: float, result: int) -> Callable[[], int]:
    def call() -> int:
        time.sleep(seconds)
        return result

    return call


def run_quick_beside_task(runner: StoreRunner, call: Callable[[], int]) -> tuple[int, list[str]]:
    """Return the result of ``runner.run_quick(call)`` and whether a task started just before it ran meanwhile."""
    marks: list[str] = []

    async def mark() -> None:
        marks.append("ran")

    async def main() -> tuple[int, list[str]]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mark)
            result = await runner.run_quick(call)
            seen = list(marks)
        return result, seen

    return trio.run(main)


def test_quick_call_blocks_without_yielding() -> None:
    runner = StoreRunner(quick_wait_us=1_000_000)
    runner.may_block = lambda: True

    result, seen = run_quick_beside_task(runner, sleeper(0.0, 7))

    assert result == 7
    assert seen == []


def test_quick_call_yields_unless_allowed() -> None:
    runner = StoreRunner(quick_wait_us=1_000_000)
    runner.may_block = lambda: False

    result, seen = run_quick_beside_task(runner, sleeper(0.0, 7))

    assert result == 7
    assert seen == ["ran"]


def test_quick_call_yields_with_zero_wait() -> None:
    runner = StoreRunner(quick_wait_us=0)
    runner.may_block = lambda: True

    result, seen = run_quick_beside_task(runner, sleeper(0.0, 7))

    assert result == 7
    assert seen == ["ran"]


def test_slow_quick_call_falls_back_to_trio() -> None:
    # The call outlasts the 1 ms wait, so the result arrives through trio's scheduler.
    runner = StoreRunner(quick_wait_us=1_000)
    runner.may_block = lambda: True

    result, seen = run_quick_beside_task(runner, sleeper(0.1, 8))

    assert result == 8
    assert seen == ["ran"]


def test_quick_call_after_slow_one_yields() -> None:
    runner = StoreRunner(quick_wait_us=10_000)
    runner.may_block = lambda: True

    slow_result, _ = run_quick_beside_task(runner, sleeper(0.1, 1))
    after_slow = run_quick_beside_task(runner, sleeper(0.0, 2))
    after_fast = run_quick_beside_task(runner, sleeper(0.0, 3))

    assert slow_result == 1
    assert after_slow == (2, ["ran"])
    assert after_fast == (3, [])


@pytest.mark.parametrize("seconds", [0.0, 0.1], ids=["within-wait", "after-wait"])
def test_quick_call_error_propagates(seconds: float) -> None:
    runner = StoreRunner(quick_wait_us=10_000)
    runner.may_block = lambda: True

    def fail() -> int:
        time.sleep(seconds)
        raise FileNotFoundError("missing item")

    async def main() -> None:
        await runner.run_quick(fail)

    with pytest.raises(FileNotFoundError, match="missing item"):
        trio.run(main)


def test_quick_calls_near_limit_return() -> None:
    # Calls that end about when the wait ends exercise both sides of the hand-over.
    runner = StoreRunner(quick_wait_us=200)
    runner.may_block = lambda: True

    async def main() -> list[int]:
        results = []
        for index in range(300):
            results.append(await runner.run_quick(sleeper(0.0002 * (index % 3), index)))
        return results

    assert trio.run(main) == list(range(300))


def test_negative_quick_wait_rejected() -> None:
    with pytest.raises(ValueError, match="quick_wait_us"):
        StoreRunner(quick_wait_us=-1)
