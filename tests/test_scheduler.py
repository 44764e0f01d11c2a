"""Scheduler policy, step by step: chunked prefill, prefix hits, preemption, FCFS/priority.

Driven through tests/scheduler_harness.py with exact plans; check_integrity() after every step.
"""

from __future__ import annotations

import pytest

from scheduler_svc.request import RequestStatus
from tests.scheduler_harness import ABORT, LENGTH, Harness, cached, news, toks

# ---------------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_under_the_token_budget_samples_only_on_the_last_chunk() -> None:
    h = Harness(budget=8)
    h.add("a", toks(1, 20), max_tokens=3)

    plan, outs = h.step()
    assert news(plan) == [("a", 0, 8, [1, 2])] and cached(plan) == [] and h.sampled == [] and outs == []
    plan, outs = h.step()
    assert news(plan) == [] and cached(plan) == [("a", 8, 8, [3, 4])] and h.sampled == [] and outs == []
    plan, outs = h.step()
    assert cached(plan) == [("a", 16, 4, [5])] and h.sampled == ["a"]
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [("a", h.fed["a"], None)]
    plan, _ = h.step()
    assert cached(plan) == [("a", 20, 1, [6])] and h.sampled == ["a"]  # token 21 opens block 6
    plan, _ = h.step()
    assert cached(plan) == [("a", 21, 1, [])] and h.sampled == ["a"]
    assert h.final["a"].finish_reason == LENGTH and h.outputs["a"] == h.fed["a"] and len(h.fed["a"]) == 3

    plan = h.schedule()
    assert plan.finished_request_ids == ["a"] and news(plan) == [] and cached(plan) == []
    assert h.kv.usage == 0 and not h.sched.has_unfinished


def test_running_decodes_are_scheduled_before_new_prefills() -> None:
    h = Harness(budget=8)
    h.add("a", toks(1, 4), max_tokens=4)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 4, [1])] and h.sampled == ["a"]

    h.add("b", toks(101, 20), max_tokens=1)
    plan, _ = h.step()
    assert cached(plan) == [("a", 4, 1, [2])]
    assert news(plan) == [("b", 0, 7, [3, 4])]  # the decode took 1 of the 8 tokens
    assert h.sampled == ["a"]
    plan, _ = h.step()
    assert cached(plan) == [("a", 5, 1, []), ("b", 7, 7, [5, 6])] and h.sampled == ["a"]
    plan, _ = h.step()
    assert cached(plan) == [("a", 6, 1, []), ("b", 14, 6, [7])] and h.sampled == ["a", "b"]
    assert (h.final["a"].finish_reason, h.final["b"].finish_reason) == (LENGTH, LENGTH)
    assert h.outputs == h.fed and [len(h.fed[r]) for r in "ab"] == [4, 1]

    plan = h.schedule()
    assert plan.finished_request_ids == ["a", "b"] and h.kv.usage == 0


def test_max_num_seqs_holds_back_admission_until_a_request_finishes() -> None:
    h = Harness(max_num_seqs=2)
    h.add("a", toks(1, 4), max_tokens=1)
    h.add("b", toks(11, 4), max_tokens=3)
    h.add("c", toks(21, 4), max_tokens=1)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 4, [1]), ("b", 0, 4, [2])] and h.sampled == ["a", "b"]
    assert [r.request_id for r in h.sched.waiting] == ["c"]
    assert h.final["a"].finish_reason == LENGTH

    plan, _ = h.step()
    assert plan.finished_request_ids == ["a"]
    assert cached(plan) == [("b", 4, 1, [3])] and news(plan) == [("c", 0, 4, [4])]
    h.run_until_idle()
    assert h.outputs == h.fed and sorted(h.final) == ["a", "b", "c"]


# ---------------------------------------------------------------------------- prefix caching


def test_shared_two_block_prefix_is_reused() -> None:
    h = Harness()
    h.add("a", toks(1, 10), max_tokens=4)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 10, [1, 2, 3])]

    h.add("b", toks(1, 8) + [50, 51, 52], max_tokens=1)
    plan, outs = h.step()
    assert cached(plan) == [("a", 10, 1, [])]
    assert news(plan) == [("b", 8, 3, [1, 2, 4])]  # the first two blocks are a's
    assert h.sampled == ["b", "a"]  # new sequences come first in the worker's batch
    assert {o.request_id: o.num_cached_tokens for o in outs} == {"a": 0, "b": 8}
    assert (h.sched.prefix_cache_queries, h.sched.prefix_cache_hits) == (21, 8)
    h.run_until_idle()
    assert h.outputs == h.fed and h.kv.usage == 0


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    h = Harness()
    h.add("a", toks(1, 8), max_tokens=1)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 8, [1, 2])]
    assert h.final["a"].finish_reason == LENGTH

    h.add("b", toks(1, 8), max_tokens=1)
    plan, outs = h.step()
    assert plan.finished_request_ids == ["a"]
    # Only block 1 counts as a hit: the last prompt token must run to produce logits, so the
    # second block is recomputed into a fresh block (3), never written into shared block 2.
    assert news(plan) == [("b", 4, 4, [1, 3])] and h.sampled == ["b"]
    assert outs[0].num_cached_tokens == 4


def test_prefix_statistics_count_an_admission_once_even_when_retried() -> None:
    h = Harness(num_blocks=4)  # 3 usable blocks
    h.add("a", toks(1, 8), max_tokens=3)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 8, [1, 2])]
    h.add("b", toks(1, 8) + toks(60, 4), max_tokens=1)  # hits 2 blocks, needs 1 more
    plan, _ = h.step()  # a takes block 3 for token 9, so b cannot be admitted yet
    assert cached(plan) == [("a", 8, 1, [3])] and news(plan) == []
    plan, _ = h.step()
    assert cached(plan) == [("a", 9, 1, [])] and news(plan) == []
    assert h.final["a"].finish_reason == LENGTH
    plan, outs = h.step()
    assert plan.finished_request_ids == ["a"] and news(plan) == [("b", 8, 4, [1, 2, 3])]
    assert outs[0].num_cached_tokens == 8
    assert (h.sched.prefix_cache_queries, h.sched.prefix_cache_hits) == (8 + 12, 8)


def test_prefix_caching_disabled_never_hits() -> None:
    h = Harness(prefix_caching=False)
    h.add("a", toks(1, 8), max_tokens=1)
    h.step()
    h.add("b", toks(1, 8), max_tokens=1)
    plan, outs = h.step()
    assert news(plan) == [("b", 0, 8, [3, 4])] and outs[0].num_cached_tokens == 0
    assert (h.sched.prefix_cache_queries, h.sched.prefix_cache_hits) == (0, 0)


# ---------------------------------------------------------------------------- preemption


def test_newest_request_is_preempted_and_recomputed_without_losing_tokens() -> None:
    h = Harness(num_blocks=5)  # 4 usable blocks of 4 tokens
    h.add("a", toks(1, 6), max_tokens=5)
    h.add("b", toks(11, 6), max_tokens=5)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 6, [1, 2]), ("b", 0, 6, [3, 4])] and h.sampled == ["a", "b"]
    plan, _ = h.step()
    assert cached(plan) == [("a", 6, 1, []), ("b", 6, 1, [])]
    plan, _ = h.step()
    assert cached(plan) == [("a", 7, 1, []), ("b", 7, 1, [])]

    # Both hold 9 tokens; a's 9th needs a third block and none is free: b, the newest, goes.
    plan, outs = h.step()
    assert plan.finished_request_ids == ["b"]
    assert cached(plan) == [("a", 8, 1, [4])] and news(plan) == [] and h.sampled == ["a"]
    assert [o.request_id for o in outs] == ["a"]
    b = h.sched.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert h.sched.num_preemptions == 1 and h.kv.block_ids("b") == []

    plan, _ = h.step()  # b does not fit next to a (1 block free, b needs 3 minus 1 hit)
    assert cached(plan) == [("a", 9, 1, [])] and news(plan) == []
    assert h.final["a"].finish_reason == LENGTH

    plan, _ = h.step()
    assert plan.finished_request_ids == ["a"]
    # Resumed from its prompt plus its 3 outputs; block 3 (b's first) is still cached.
    assert news(plan) == [("b", 4, 5, [3, 4, 2])] and plan.new_seqs[0].num_prompt_tokens == 6
    assert len(plan.new_seqs[0].token_ids) == 9 and h.sampled == ["b"]
    plan, _ = h.step()
    assert cached(plan) == [("b", 9, 1, [])]
    assert h.final["b"].finish_reason == LENGTH and h.final["b"].num_cached_tokens == 0
    assert h.outputs == h.fed and [len(h.fed[r]) for r in "ab"] == [5, 5]
    assert len(set(h.fed["a"] + h.fed["b"])) == 10
    assert h.schedule().finished_request_ids == ["b"] and h.kv.usage == 0


def test_victim_is_the_newest_not_the_first_other_request() -> None:
    """b (the middle request) runs out of blocks: c, the newest, goes; a is left alone."""
    h = Harness(num_blocks=6)  # 5 usable blocks
    h.add("a", toks(1, 3), max_tokens=3)
    h.add("b", toks(11, 8), max_tokens=3)
    h.add("c", toks(21, 6), max_tokens=3)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 3, [1]), ("b", 0, 8, [2, 3]), ("c", 0, 6, [4, 5])]
    plan, _ = h.step()
    assert plan.finished_request_ids == ["c"]
    assert cached(plan) == [("a", 3, 1, []), ("b", 8, 1, [5])] and news(plan) == []
    plan, _ = h.step()  # a takes the last free block; c cannot come back yet
    assert cached(plan) == [("a", 4, 1, [4]), ("b", 9, 1, [])] and news(plan) == []
    assert (h.final["a"].finish_reason, h.final["b"].finish_reason) == (LENGTH, LENGTH)
    plan, _ = h.step()
    assert plan.finished_request_ids == ["a", "b"] and news(plan) == [("c", 0, 7, [4, 1])]
    h.run_until_idle()
    assert h.outputs == h.fed and [len(h.fed[r]) for r in "abc"] == [3, 3, 3]


def test_no_admission_in_a_step_that_preempted() -> None:
    """Blocks freed by a preemption are not handed to a waiting request in the same step."""
    h = Harness(num_blocks=5, policy="priority")
    h.add("a", toks(1, 6), priority=0, max_tokens=5)
    h.add("c", toks(11, 6), priority=1, max_tokens=5)
    for _ in range(3):
        h.step()
    h.add("w", toks(31, 3), priority=0, max_tokens=1)
    plan, _ = h.step()
    assert plan.finished_request_ids == ["c"] and cached(plan) == [("a", 8, 1, [4])]
    assert news(plan) == []  # block 3 is free, but this step preempted
    plan, _ = h.step()
    assert cached(plan) == [("a", 9, 1, [])] and news(plan) == [("w", 0, 3, [3])]
    h.run_until_idle()
    assert h.outputs == h.fed and h.kv.usage == 0


def test_request_alone_that_outgrows_the_cache_preempts_itself() -> None:
    h = Harness(num_blocks=4, max_model_len=64)  # 12 token slots, context 64: misconfigured
    h.add("a", toks(1, 10), max_tokens=10)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 10, [1, 2, 3])]
    assert cached(h.step()[0]) == [("a", 10, 1, [])]
    assert cached(h.step()[0]) == [("a", 11, 1, [])]
    plan, outs = h.step()  # the 13th token needs a fourth block
    assert plan.finished_request_ids == ["a"] and news(plan) == [] and cached(plan) == []
    assert outs == [] and h.sampled == []
    req = h.sched.requests["a"]
    assert req.status == RequestStatus.PREEMPTED and req.num_output_tokens == 3
    assert h.kv.usage == 0 and h.sched.has_unfinished
    plan, _ = h.step()  # still cannot fit: nothing runs, nothing crashes
    assert news(plan) == [] and cached(plan) == [] and plan.finished_request_ids == []
    assert [o.finish_reason for o in h.sched.abort(["a"])] == [ABORT]
    h.sched.check_integrity()
    assert h.outputs["a"] == h.fed["a"] and not h.sched.has_unfinished and h.kv.usage == 0


# ---------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    "policy, order", [("fcfs", ["a", "b", "c", "d"]), ("priority", ["d", "b", "c", "a"])]
)
def test_admission_order(policy: str, order: list[str]) -> None:
    h = Harness(max_num_seqs=1, policy=policy)
    for i, (rid, priority) in enumerate([("a", 5), ("b", 1), ("c", 1), ("d", 0)]):
        h.add(rid, toks(10 * i + 1, 4), priority=priority, max_tokens=1)
    admitted = []
    for _ in range(4):
        plan, _ = h.step()
        assert len(plan.new_seqs) == 1
        admitted.append(plan.new_seqs[0].request_id)
    assert admitted == order and not h.sched.has_unfinished


@pytest.mark.parametrize("policy, victim, survivor", [("fcfs", "b", "a"), ("priority", "a", "b")])
def test_preemption_victim(policy: str, victim: str, survivor: str) -> None:
    """a is older but less urgent (priority 1) than b (priority 0)."""
    h = Harness(num_blocks=5, policy=policy)
    h.add("a", toks(1, 6), priority=1, max_tokens=8)
    h.add("b", toks(11, 6), priority=0, max_tokens=8)
    plan, _ = h.step()
    first, second = ("a", "b") if policy == "fcfs" else ("b", "a")
    assert news(plan) == [(first, 0, 6, [1, 2]), (second, 0, 6, [3, 4])]
    h.step()
    h.step()
    plan, _ = h.step()
    assert plan.finished_request_ids == [victim]
    held = [1, 2] if survivor == first else [3, 4]
    assert cached(plan) == [(survivor, 8, 1, [4])] and h.kv.block_ids(survivor) == held + [4]
    assert h.sched.requests[victim].status == RequestStatus.PREEMPTED
    h.run_until_idle()
    assert h.outputs == h.fed and [len(h.fed[r]) for r in "ab"] == [8, 8]
