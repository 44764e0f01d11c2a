"""The scheduler process's per-worker queue of plans: pipelining depth and arrival batching."""

from __future__ import annotations

from protocol.config import CacheSettings, SchedulerSettings
from protocol.messages import AddRequest, WorkerHello, WorkerRole
from protocol.sampling import SamplingParams
from scheduler_svc.worker_slot import WorkerSlot
from tests.scheduler_harness import FakeWorker


def _slot(depth: int) -> WorkerSlot:
    hello = WorkerHello(worker_id="w", role=WorkerRole.MIXED, pid=1, host="h", device="cpu",
                        model="m", num_kv_blocks=64, block_size=4, max_model_len=64, vocab_size=100)
    return WorkerSlot.create(hello, b"w", SchedulerSettings(max_inflight_steps=depth),
                             CacheSettings(block_size=4), now=0.0, seed=0)


def _add(slot: WorkerSlot, rid: str, max_tokens: int = 4) -> None:
    slot.scheduler.add_request(AddRequest(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens), [], 0.0))


def test_arrivals_wait_for_a_busy_worker_and_join_one_step():
    slot = _slot(depth=2)
    _add(slot, "a")
    first = slot.next_plan(pipeline=False)
    assert [s.request_id for s in first.new_seqs] == ["a"]
    _add(slot, "b")
    _add(slot, "c")
    assert slot.next_plan(pipeline=False) is None  # a step is running: b and c wait for it
    assert slot.complete(first.step_id) is first and not slot.inflight
    second = slot.next_plan(pipeline=True)
    assert [s.request_id for s in second.new_seqs] == ["b", "c"]


def test_results_top_the_queue_up_to_the_depth_in_order():
    slot = _slot(depth=2)
    worker = FakeWorker(4)
    _add(slot, "a", max_tokens=3)
    plans = [slot.next_plan(pipeline=True), slot.next_plan(pipeline=True)]
    assert slot.next_plan(pipeline=True) is None and len(slot.inflight) == 2
    outputs = []
    while slot.inflight:
        plan = slot.inflight[0]
        result = worker.run(plan, lambda rid, i: 10 + i)
        assert slot.complete(result.step_id) is plan
        outputs += slot.scheduler.update(result)
        while (nxt := slot.next_plan(pipeline=True)) is not None:
            plans.append(nxt)
    assert [t for o in outputs for t in o.new_token_ids] == [10, 11, 12]
    assert outputs[-1].finish_reason is not None
    # three samples, each computed once: nothing ran past max_tokens
    assert sum(len(p.new_seqs) + len(p.cached_seqs) for p in plans) == 3
    assert slot.complete(999) is None


def test_depth_one_is_synchronous():
    slot = _slot(depth=1)
    _add(slot, "a")
    assert slot.next_plan(pipeline=True) is not None
    assert slot.next_plan(pipeline=True) is None
