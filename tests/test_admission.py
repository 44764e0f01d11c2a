"""Admission, pure: the gateway's door check and the scheduler's stack-wide waiting bound."""

from __future__ import annotations

import pytest

from gateway.admission import DEFAULT_RETRY, MAX_RETRY, MIN_RETRY, DoorAdmission, retry_headers
from protocol.config import SchedulerSettings
from scheduler_svc.admission import (batch_capacity, num_waiting, num_waiting_for_slot, queued_too_long,
                                     waiting_bound)
from scheduler_svc.worker_scheduler import QueueFull
from tests.central_harness import Cluster, M
from tests.scheduler_harness import toks


def test_the_door_admits_while_the_waiting_estimate_stays_within_the_bound() -> None:
    door = DoorAdmission()
    # 4 can run at once, 1 is generating: 3 of the 5 pending can start, 2 wait.
    assert door.check(pending=5, started=1, new=2, bound=4, capacity=4, now=0.0) is None
    assert door.check(pending=5, started=1, new=2, bound=3, capacity=4, now=0.0) is not None
    assert door.check(pending=5, started=1, new=1, bound=3, capacity=4, now=0.0) is None
    assert door.check(pending=3, started=1, new=16, bound=1, capacity=4, now=0.0) is None  # none waits
    assert door.check(pending=50, started=0, new=1, bound=0, capacity=4, now=0.0) is None  # no stats yet


def test_retry_after_follows_the_finish_rate_and_is_clamped() -> None:
    door = DoorAdmission(window=10.0)
    refusal = door.check(pending=10, started=0, new=1, bound=2, capacity=4, now=100.0)
    assert refusal is not None and refusal.retry_after == DEFAULT_RETRY  # no rate known yet
    assert "6 requests are waiting" in refusal.message and "bound is 2" in refusal.message
    for i in range(20):  # 20 finished in the last 10 s: 2 per second
        door.note_finished(95.0 + i * 0.25)
    assert door.finish_rate(100.0) == 2.0
    refusal = door.check(pending=10, started=0, new=1, bound=2, capacity=4, now=100.0)
    assert refusal is not None and refusal.retry_after == pytest.approx(2.5)  # 5 too many / 2 per s
    assert door.retry_after(1, 100.0) == 0.5
    assert DoorAdmission().retry_after(1, 0.0) == DEFAULT_RETRY and MIN_RETRY > 0
    assert door.retry_after(10_000, 100.0) == MAX_RETRY
    assert door.finish_rate(200.0) == 0.0  # the window moved past them


def test_retry_headers_in_seconds_and_milliseconds() -> None:
    assert retry_headers(2.5) == {"retry-after": "3", "retry-after-ms": "2500"}
    assert retry_headers(0.1) == {"retry-after": "1", "retry-after-ms": "100"}


def test_the_default_waiting_bound_is_one_batch_per_ready_worker_and_stack_wide() -> None:
    c = Cluster([M, M], num_blocks=64, max_num_seqs=1)
    slots = c.central.workers.values()
    assert batch_capacity(c.central.sched, slots) == 2 and waiting_bound(c.central.sched, slots) == 2
    for i in range(4):  # two run (one per worker), two wait
        c.add(f"r{i}", toks(10 * i + 1, 4), max_tokens=50)
    assert num_waiting(slots) == 2
    with pytest.raises(QueueFull, match="bound is 2"):
        c.add("r4", toks(60, 4), max_tokens=50)
    c.kill("w1")  # its requests move to w0; the bound shrinks with the ready workers
    assert waiting_bound(c.central.sched, c.central.workers.values()) == 1


def test_a_burst_as_large_as_the_free_slots_plus_the_bound_is_admitted() -> None:
    """2,000 requests at once on a batch of 1,024 were 716 x 429 while the queue held requests
    that had a free slot and waited only for prefill budget: only those without a slot count."""
    c = Cluster([M], num_blocks=64, budget=4, max_num_seqs=4, max_waiting_requests=2)
    slots = c.central.workers.values()
    for i in range(6):  # a 4-token budget prefills one 4-token prompt per step: the rest queue
        c.add(f"r{i}", toks(10 * i + 1, 4), max_tokens=50)
    running = len(c.central.workers["w0"].scheduler.running)
    assert num_waiting(slots) == 6 - running and num_waiting_for_slot(c.central.sched, slots) == 2
    with pytest.raises(QueueFull, match="2 requests are waiting for a batch slot already"):
        c.add("r6", toks(70, 4), max_tokens=50)


def test_an_explicit_bound_is_stack_wide_and_kv_caps_the_default() -> None:
    c = Cluster([M, M], num_blocks=64, max_num_seqs=1, max_waiting_requests=1)
    for i in range(3):
        c.add(f"r{i}", toks(10 * i + 1, 4), max_tokens=50)
    with pytest.raises(QueueFull):
        c.add("r3", toks(40, 4), max_tokens=50)
    few_blocks = Cluster([M], num_blocks=8, max_num_seqs=128)
    assert waiting_bound(few_blocks.central.sched, few_blocks.central.workers.values()) == 7  # usable blocks
    assert waiting_bound(SchedulerSettings(), []) == 1


def test_queued_too_long_names_only_requests_never_scheduled() -> None:
    c = Cluster([M], max_num_seqs=1)
    c.add("runs", toks(1, 4), max_tokens=50)
    c.now += 5
    c.add("waits", toks(11, 4), max_tokens=50)
    slots = c.central.workers.values()
    assert [r.request_id for r in queued_too_long(slots, 3.0, c.now + 2)] == []
    assert [r.request_id for r in queued_too_long(slots, 3.0, c.now + 4)] == ["waits"]
