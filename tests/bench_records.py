"""A successful `pdserve bench` request record with chosen timings, for the bench tests."""

from __future__ import annotations

from pdserve.bench.client import RequestRecord


def bench_record(index: int, ttft: float, e2e: float, out: int, itl: list[float], start: float,
                 prompt: int = 10) -> RequestRecord:
    return RequestRecord(index=index, success=True, prompt_len=prompt, output_len=out, ttft=ttft,
                         itl=itl, e2e=e2e, start_time=start, usage_reported=True)
