"""ClaimWakeups on a clock the test moves: a wake that found nobody waiting is kept for a
claim coming back in line, briefly, and never handed to a claim that has just entered (it asks
the database first anyway)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from dan.nodes.wakeups import KEEP_S, ClaimWakeups


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(scenario: Callable[[ClaimWakeups, Clock], Awaitable[None]]) -> None:
    clock = Clock()
    asyncio.run(scenario(ClaimWakeups(monotonic=clock), clock))


def test_a_claim_that_enters_gets_no_kept_wake_and_waits_in_line() -> None:
    """Before: the first of the kept wakes was handed to a brand-new claim, which then asked
    the database twice in a row for nothing."""

    async def scenario(wakeups: ClaimWakeups, clock: Clock) -> None:
        wakeups.task_queued("queued-while-nobody-waited")  # kept
        waiter = wakeups.enter()
        assert wakeups.take(waiter) is None and len(wakeups) == 1
        wakeups.task_queued("next")  # it waits in line: the next notice is its
        wake = wakeups.take(waiter)
        assert wake is not None and wake.task_id == "next"
        wakeups.back_in_line(waiter)  # back from its look: the kept wake is still fresh
        kept = wakeups.take(waiter)
        assert kept is not None and kept.task_id == "queued-while-nobody-waited"

    run(scenario)


def test_kept_wakes_age_out() -> None:
    """Before: a burst of notices while every claim was busy was kept (up to 1,024) and
    replayed to claims coming back, one stale wake after another, however long ago it came."""

    async def scenario(wakeups: ClaimWakeups, clock: Clock) -> None:
        for i in range(500):  # a flood of submits and cancels while every claim is busy
            wakeups.task_queued(f"stale-{i}")
        clock.now += KEEP_S + 0.5
        wakeups.task_queued("recent")
        waiter = wakeups.enter()
        wakeups.task_queued("now")
        assert wakeups.take(waiter).task_id == "now"  # type: ignore[union-attr]
        wakeups.back_in_line(waiter)
        assert wakeups.take(waiter).task_id == "recent"  # type: ignore[union-attr]
        wakeups.back_in_line(waiter)
        assert wakeups.take(waiter) is None and len(wakeups) == 1  # the stale ones are gone

    run(scenario)


def test_a_kept_wake_within_its_time_goes_to_the_next_claim_back_in_line() -> None:
    async def scenario(wakeups: ClaimWakeups, clock: Clock) -> None:
        first = wakeups.enter()
        wakeups.task_queued("a")
        assert wakeups.take(first).task_id == "a"  # type: ignore[union-attr]
        wakeups.task_queued("b")  # the only claim is asking the database: kept
        clock.now += KEEP_S / 2
        wakeups.back_in_line(first)
        assert wakeups.take(first).task_id == "b"  # type: ignore[union-attr]

    run(scenario)
