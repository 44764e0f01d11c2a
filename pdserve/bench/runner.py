"""Scheduling: when each request is sent, how many may be in flight, and when the run stops.

Arrivals follow a seeded Poisson process (exponential gaps at --request-rate; an infinite rate
sends everything at once); --max-concurrency caps requests in flight independently, as a pool
of clients would. The run is bounded by the number of requests and by a wall-clock limit. The
sender is injected, so this module has no sockets and is tested with plain coroutines.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.bench.client import RequestRecord
from pdserve.bench.datasets import BenchRequest

Sender = Callable[[int, BenchRequest], Awaitable[RequestRecord]]


def poisson_arrival_times(num: int, request_rate: float, seed: int) -> list[float]:
    """Send offsets in seconds: the first at 0, then exponential gaps of mean 1/rate."""
    if request_rate <= 0 or math.isnan(request_rate):
        raise ValueError(f"--request-rate must be > 0 (inf = all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(num):
        if i > 0:
            t += rng.expovariate(request_rate)
        times.append(t)
    return times


@dataclass
class RunResult:
    """Records in request order, the perf_counter start, and the wall time until the last end."""

    records: list[RequestRecord]
    start: float
    duration: float
    not_sent: int = 0  # requests the time limit stopped before they were sent
    stopped_by_time_limit: bool = False
    server_phases: dict[str, Any] | None = None  # from the server's /metrics (server_phases.py)


async def run_schedule(requests: Sequence[BenchRequest], send: Sender, arrival_times: Sequence[float],
                       max_concurrency: int | None = None, max_duration: float | None = None
                       ) -> RunResult:
    """Send every request at its arrival offset (waiting for a concurrency slot if capped).

    At `max_duration` seconds nothing more is sent and requests still in flight are cancelled
    and recorded as failures; requests never sent are counted, not recorded.
    """
    if len(arrival_times) != len(requests):
        raise ValueError("one arrival time per request")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    started: dict[int, float] = {}
    tasks: list[asyncio.Task[RequestRecord]] = []
    start = time.perf_counter()

    async def one(index: int) -> RequestRecord:
        if slots is None:
            return await _send_one(send, index, requests[index], started)
        async with slots:
            return await _send_one(send, index, requests[index], started)

    async def launch_and_wait() -> None:
        for index, offset in enumerate(arrival_times):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
        if tasks:
            await asyncio.wait(tasks)

    timeout = None if max_duration is None else max(0.0, start + max_duration - time.perf_counter())
    try:
        await asyncio.wait_for(launch_and_wait(), timeout)
    except TimeoutError:
        pass  # stops launching; asyncio.wait leaves the request tasks running, cancelled below
    for task in tasks:
        task.cancel()  # no-op for finished ones
    await asyncio.gather(*tasks, return_exceptions=True)
    end = time.perf_counter()
    records: list[RequestRecord] = []
    cancelled = 0
    for index, task in enumerate(tasks):
        if not task.cancelled():
            records.append(task.result())
        elif index in started:
            cancelled += 1
            records.append(RequestRecord(index=index, error="cancelled at the run time limit",
                                         prompt_len=requests[index].prompt_len,
                                         start_time=started[index], e2e=end - started[index]))
    not_sent = len(requests) - len(records)
    return RunResult(records, start, end - start, not_sent=not_sent,
                     stopped_by_time_limit=cancelled > 0 or not_sent > 0)


async def _send_one(send: Sender, index: int, request: BenchRequest, started: dict[int, float]) -> RequestRecord:
    started[index] = time.perf_counter()
    try:
        return await send(index, request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a sender bug must not abort the whole run
        return RequestRecord(index=index, error=f"{type(exc).__name__}: {exc}",
                             prompt_len=request.prompt_len, start_time=started[index])
