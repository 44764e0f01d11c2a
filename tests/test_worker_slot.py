"""The scheduler process's per-worker queue of plans: pipelining depth and arrival batching."""

from __future__ import annotations

import random

import pytest

from protocol.config import CacheSettings, SchedulerSettings
from protocol.messages import AddRequest, FinishReason, WorkerHello, WorkerRole
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


@pytest.mark.parametrize("seed", range(6))
def test_pipelined_plans_under_kv_pressure_lose_and_repeat_nothing(seed):
    """Two plans in flight, a cache too small for everyone (preemptions), arrivals and aborts at
    random: every finished request has exactly the tokens the worker sampled for it, in order."""
    rng = random.Random(seed)
    hello = WorkerHello(worker_id="w", role=WorkerRole.MIXED, pid=1, host="h", device="cpu",
                        model="m", num_kv_blocks=10, block_size=4, max_model_len=36, vocab_size=100)
    slot = WorkerSlot.create(hello, b"w", SchedulerSettings(max_inflight_steps=2, max_num_batched_tokens=16),
                             CacheSettings(block_size=4), now=0.0, seed=0)
    worker = FakeWorker(4)
    choose = lambda rid, i: (hash((rid, i)) % 97) + 1  # noqa: E731 (deterministic per request)
    outputs: dict[str, list[int]] = {}
    finished: dict[str, FinishReason] = {}
    pending = [f"r{i}" for i in range(12)]
    aborted: set[str] = set()
    for _ in range(2000):
        if pending and rng.random() < 0.7:
            rid = pending.pop(0)
            n_prompt = rng.randint(1, 12)
            slot.scheduler.add_request(AddRequest(rid, [rng.randint(1, 99) for _ in range(n_prompt)],
                                                  SamplingParams(max_tokens=rng.randint(1, 20)), [], 0.0))
            outputs[rid] = []
        if slot.scheduler.running and rng.random() < 0.05:
            rid = rng.choice(slot.scheduler.running).request_id
            aborted.add(rid)
            for out in slot.scheduler.abort([rid]):
                finished[out.request_id] = out.finish_reason
        while slot.next_plan(pipeline=True) is not None:
            pass
        if slot.inflight:
            plan = slot.inflight[0]
            result = worker.run(plan, choose)
            assert slot.complete(result.step_id) is plan
            for out in slot.scheduler.update(result):
                outputs[out.request_id] += out.new_token_ids
                if out.finish_reason is not None:
                    finished[out.request_id] = out.finish_reason
            slot.scheduler.check_integrity()
        elif not pending and not slot.scheduler.has_unfinished:
            break
    assert not pending and not slot.scheduler.has_unfinished
    assert slot.scheduler.num_preemptions > 0  # the cache is tight on purpose
    for rid, toks in outputs.items():
        assert rid in finished
        assert toks == [choose(rid, i) for i in range(len(toks))], rid
        if rid not in aborted:
            assert finished[rid] == FinishReason.LENGTH
