"""`pdserve bench` schedule: seeded Poisson arrivals, concurrency caps, time limits (pure parts).

No server here: the end-to-end run against a real `pdserve up` lives with the serving tests.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from pdserve.bench.client import RequestRecord
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.runner import poisson_arrival_times, run_schedule
from tests.bench_records import bench_record as _rec


# ---------------------------------------------------------------- schedule

def test_poisson_schedule_is_seeded():
    a = poisson_arrival_times(50, 4.0, seed=7)
    assert a == poisson_arrival_times(50, 4.0, seed=7)
    assert a != poisson_arrival_times(50, 4.0, seed=8)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = poisson_arrival_times(20001, 4.0, seed=1)
    assert gaps[-1] / 20000 == pytest.approx(0.25, rel=0.03)  # mean gap 1/rate
    assert poisson_arrival_times(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            poisson_arrival_times(3, bad, seed=0)


def _requests(n: int) -> list[BenchRequest]:
    return [BenchRequest(f"p{i}", 3, 4) for i in range(n)]


def test_run_schedule_caps_concurrency_and_keeps_order():
    in_flight, peak = 0, 0

    async def send(index: int, request: BenchRequest) -> RequestRecord:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01 * (5 - index % 5))
        in_flight -= 1
        return _rec(index, 0.01, 0.02, 2, [0.01], 0.0)

    result = asyncio.run(run_schedule(_requests(10), send, [0.0] * 10, max_concurrency=3))
    assert peak == 3
    assert [r.index for r in result.records] == list(range(10))
    assert result.not_sent == 0 and not result.stopped_by_time_limit


def test_run_schedule_follows_arrival_times():
    sent_at: dict[int, float] = {}
    loop_start: list[float] = []

    async def send(index: int, request: BenchRequest) -> RequestRecord:
        sent_at[index] = asyncio.get_running_loop().time() - loop_start[0]
        return _rec(index, 0.0, 0.0, 1, [], 0.0)

    async def main_() -> None:
        loop_start.append(asyncio.get_running_loop().time())
        await run_schedule(_requests(3), send, [0.0, 0.1, 0.2])

    asyncio.run(main_())
    assert sent_at[0] < 0.05 and 0.1 <= sent_at[1] < 0.18 and 0.2 <= sent_at[2] < 0.28


def test_run_schedule_time_limit_cancels_and_counts_unsent():
    async def send(index: int, request: BenchRequest) -> RequestRecord:
        await asyncio.sleep(0.0 if index == 0 else 10.0)
        return _rec(index, 0.0, 0.0, 1, [], 0.0)

    result = asyncio.run(run_schedule(_requests(4), send, [0.0, 0.0, 0.0, 5.0], max_duration=0.2))
    assert result.duration < 1.0 and result.stopped_by_time_limit
    assert [(r.index, r.success) for r in result.records] == [(0, True), (1, False), (2, False)]
    assert result.records[1].error == "cancelled at the run time limit"
    assert result.not_sent == 1


def test_run_schedule_turns_sender_exceptions_into_failures():
    async def send(index: int, request: BenchRequest) -> RequestRecord:
        raise RuntimeError("bug")

    result = asyncio.run(run_schedule(_requests(2), send, [0.0, 0.0]))
    assert [r.error for r in result.records] == ["RuntimeError: bug"] * 2
