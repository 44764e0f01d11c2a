"""The scheduler's periodic throughput line: exact text, when it is due, and silence when idle."""

from __future__ import annotations

import pytest

from protocol.config import ConfigError, SchedulerSettings
from scheduler_svc.throughput_log import ThroughputLog, WorkTotals


def test_the_line_reports_the_interval_s_rates_and_the_stack_s_state() -> None:
    log = ThroughputLog(interval=2.0, now=100.0)
    totals = WorkTotals(steps=40, computed_tokens=9000, generated_tokens=1000, busy_seconds=3.0)
    assert log.line(101.0, totals, running=5, waiting=2, kv_usage=0.25, ready_workers=2) is None  # not due
    assert log.line(102.0, totals, running=5, waiting=2, kv_usage=0.25, ready_workers=2) == (
        "20.0 steps/s, computed 4500 tok/s, generated 500 tok/s, workers busy 75% (2 ready), "
        "running 5, waiting 2, KV cache 25.0%")
    later = WorkTotals(steps=50, computed_tokens=9400, generated_tokens=1400, busy_seconds=5.5)
    assert log.line(106.0, later, running=1, waiting=0, kv_usage=0.0125, ready_workers=1) == (
        "2.5 steps/s, computed 100 tok/s, generated 100 tok/s, workers busy 62% (1 ready), "
        "running 1, waiting 0, KV cache 1.2%")


def test_idle_intervals_log_once_after_the_work_and_then_nothing() -> None:
    log = ThroughputLog(interval=1.0, now=0.0)
    busy = WorkTotals(steps=10, computed_tokens=100, generated_tokens=10, busy_seconds=0.5)
    assert log.line(1.0, busy, running=1, waiting=0, kv_usage=0.1, ready_workers=1) is not None
    done = log.line(2.0, busy, running=0, waiting=0, kv_usage=0.0, ready_workers=1)
    assert done == ("0.0 steps/s, computed 0 tok/s, generated 0 tok/s, workers busy 0% (1 ready), "
                    "running 0, waiting 0, KV cache 0.0%")
    assert log.line(3.0, busy, running=0, waiting=0, kv_usage=0.0, ready_workers=1) is None
    assert log.line(9.0, busy, running=0, waiting=0, kv_usage=0.0, ready_workers=1) is None
    # work again: the rates are over the time since the last check, not since the last line
    again = WorkTotals(steps=12, computed_tokens=300, generated_tokens=12, busy_seconds=0.7)
    assert log.line(10.0, again, running=0, waiting=0, kv_usage=0.0, ready_workers=1).startswith(
        "2.0 steps/s, computed 200 tok/s, generated 2 tok/s, workers busy 20%")


def test_waiting_requests_without_steps_still_log_and_no_worker_reads_as_none_busy() -> None:
    log = ThroughputLog(interval=1.0, now=0.0)
    assert log.line(1.0, WorkTotals(), running=0, waiting=3, kv_usage=0.0, ready_workers=0) == (
        "0.0 steps/s, computed 0 tok/s, generated 0 tok/s, workers busy 0% (0 ready), "
        "running 0, waiting 3, KV cache 0.0%")


def test_interval_zero_turns_it_off_and_a_negative_one_is_refused() -> None:
    log = ThroughputLog(interval=0.0, now=0.0)
    assert log.line(1e6, WorkTotals(steps=5), running=1, waiting=1, kv_usage=0.5, ready_workers=1) is None
    SchedulerSettings(log_stats_interval=0.0).validate()
    with pytest.raises(ConfigError, match="log_stats_interval must be >= 0"):
        SchedulerSettings(log_stats_interval=-1.0).validate()


def test_a_step_counted_in_the_interval_it_ends_in_does_not_read_as_more_than_all_busy() -> None:
    log = ThroughputLog(interval=1.0, now=0.0)
    line = log.line(1.0, WorkTotals(steps=3, busy_seconds=1.2), running=1, waiting=0, kv_usage=0.0,
                    ready_workers=1)
    assert "workers busy 100% (1 ready)" in line
