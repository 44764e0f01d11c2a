"""Scheduler policy, step by step: exact plans, token accounting, stops, rejections and aborts.

The scheduler is driven directly: schedule() gives a StepPlan, a fake worker (bookkeeping only, no
model) decides from the plan which sequences sample and picks their tokens, and update() takes
the StepResult. Block size 4 throughout, so block ids are easy to read off the token counts.
check_integrity() runs after every schedule() and every update().
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from protocol.config import SchedulerSettings
from protocol.messages import AddRequest, FinishReason, RequestOutput, StepPlan, StepResult
from protocol.sampling import SamplingParams
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import RequestStatus
from scheduler_svc.scheduler import QueueFull, RequestRejected, Scheduler

BS = 4
VOCAB = 1000
STOP, LENGTH, ABORT, ERROR = FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT, FinishReason.ERROR

# ---------------------------------------------------------------------------- test driver


@dataclass
class _WorkerSeq:
    tokens: list[int]
    num_prompt: int
    blocks: list[int]
    num_computed: int


class FakeWorker:
    """A worker's bookkeeping without a model: known tokens, progress and block table per sequence.

    Which sequences sample is derived from the plan exactly as the protocol defines it (the step
    reaches the end of the known tokens); `choose(request_id, output_index)` picks the token.
    It also checks the plan against its own state, as a real worker would.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seqs: dict[str, _WorkerSeq] = {}

    def run(self, plan: StepPlan, choose: Callable[[str, int], int]) -> StepResult:
        for rid in plan.finished_request_ids:
            self.seqs.pop(rid, None)
        scheduled: list[tuple[str, int, int]] = []
        for s in plan.new_seqs:
            assert s.request_id not in self.seqs, f"{s.request_id} sent as new but held"
            self.seqs[s.request_id] = _WorkerSeq(
                list(s.token_ids), s.num_prompt_tokens, list(s.block_ids), s.num_computed_tokens
            )
            scheduled.append((s.request_id, s.num_computed_tokens, s.num_scheduled_tokens))
        for c in plan.cached_seqs:
            seq = self.seqs[c.request_id]
            assert c.num_computed_tokens == seq.num_computed, f"{c.request_id} progress differs"
            seq.blocks.extend(c.new_block_ids)
            scheduled.append((c.request_id, c.num_computed_tokens, c.num_scheduled_tokens))
        ids: list[str] = []
        tokens: list[int] = []
        for rid, computed, n in scheduled:
            seq = self.seqs[rid]
            end = computed + n
            assert n > 0 and end <= len(seq.tokens), f"{rid}: scheduled past the known tokens"
            assert end <= len(seq.blocks) * self.block_size, f"{rid}: too few blocks"
            seq.num_computed = end
            if end == len(seq.tokens):
                token = choose(rid, len(seq.tokens) - seq.num_prompt)
                seq.tokens.append(token)
                ids.append(rid)
                tokens.append(token)
        return StepResult(plan.step_id, "fake", ids, np.array(tokens, dtype=np.int64))


@dataclass
class Harness:
    """Scheduler + KV manager + FakeWorker, with every token fed and every output collected."""

    num_blocks: int = 64
    budget: int = 64
    max_num_seqs: int = 16
    max_model_len: int = 256
    policy: str = "fcfs"
    prefix_caching: bool = True
    max_waiting: int = 100
    # Tokens a request samples, by output index; requests not listed get fresh unique tokens,
    # so a token that is lost or repeated shows up when outputs are compared with `fed`.
    script: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kv = KVCacheManager(self.num_blocks, BS, self.prefix_caching)
        settings = SchedulerSettings(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.budget,
            scheduling_policy=self.policy,
            max_waiting_requests=self.max_waiting,
        )
        self.sched = Scheduler(settings, self.kv, self.max_model_len, VOCAB)
        self.worker = FakeWorker(BS)
        self.prompts: dict[str, list[int]] = {}
        self.fed: dict[str, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.final: dict[str, RequestOutput] = {}
        self.seeds: dict[str, int] = {}
        self.sampled: list[str] = []  # request ids that sampled in the last step
        self._fresh = itertools.count(500)

    def add(
        self, rid: str, prompt: list[int], priority: int = 0, eos: list[int] | None = None, **params: object
    ) -> None:
        msg = AddRequest(rid, prompt, SamplingParams(**params), eos or [], 0.0, priority)
        self.sched.add_request(msg)
        self.sched.check_integrity()
        self.prompts[rid] = list(prompt)
        self.fed[rid] = []
        self.outputs[rid] = []

    def schedule(self) -> StepPlan:
        plan = self.sched.schedule()
        self.sched.check_integrity()
        for s in plan.new_seqs:  # a (re)sent sequence carries its prompt and every output so far
            assert s.token_ids == self.prompts[s.request_id] + self.outputs[s.request_id]
            assert s.num_prompt_tokens == len(self.prompts[s.request_id])
            assert self.seeds.setdefault(s.request_id, s.seed) == s.seed  # same seed on resume
        return plan

    def execute(self, plan: StepPlan) -> StepResult:
        result = self.worker.run(plan, self._choose)
        self.sampled = list(result.request_ids)
        return result

    def update(self, result: StepResult) -> list[RequestOutput]:
        outs = self.sched.update(result)
        self.sched.check_integrity()
        self.collect(outs)
        return outs

    def step(self) -> tuple[StepPlan, list[RequestOutput]]:
        plan = self.schedule()
        return plan, self.update(self.execute(plan))

    def run_until_idle(self, max_steps: int = 100) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished:
                return
            self.step()
        raise AssertionError("requests did not finish")

    def collect(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            assert out.request_id not in self.final, f"{out.request_id} reported after finishing"
            self.outputs[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                self.final[out.request_id] = out

    def _choose(self, rid: str, index: int) -> int:
        token = self.script[rid][index] if rid in self.script else next(self._fresh)
        self.fed[rid].append(token)
        return token


def news(plan: StepPlan) -> list[tuple[str, int, int, list[int]]]:
    return [
        (s.request_id, s.num_computed_tokens, s.num_scheduled_tokens, s.block_ids) for s in plan.new_seqs
    ]


def cached(plan: StepPlan) -> list[tuple[str, int, int, list[int]]]:
    return [
        (s.request_id, s.num_computed_tokens, s.num_scheduled_tokens, s.new_block_ids)
        for s in plan.cached_seqs
    ]


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


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


# ---------------------------------------------------------------------------- stops


@pytest.mark.parametrize(
    "params, script, expected_output, reason, stop_id",
    [
        ({"eos": [2]}, [5, 2, 9], [5, 2], STOP, None),
        ({"eos": [2], "ignore_eos": True, "max_tokens": 3}, [2, 2, 2, 2], [2, 2, 2], LENGTH, None),
        ({"stop_token_ids": [7]}, [5, 7, 9], [5, 7], STOP, 7),
        ({"eos": [2], "min_tokens": 3}, [2, 2, 2, 2], [2, 2, 2], STOP, None),
        ({"max_tokens": 2}, [5, 6, 7], [5, 6], LENGTH, None),
    ],
    ids=["eos", "ignore_eos", "stop_token_id", "min_tokens", "max_tokens"],
)
def test_stops(
    params: dict, script: list[int], expected_output: list[int], reason: FinishReason, stop_id: int | None
) -> None:
    h = Harness(script={"a": script})
    h.add("a", toks(100, 5), **params)
    h.run_until_idle()
    assert h.outputs["a"] == expected_output
    assert (h.final["a"].finish_reason, h.final["a"].stop_token_id) == (reason, stop_id)
    assert h.schedule().finished_request_ids == ["a"] and h.kv.usage == 0


def test_context_length_ends_the_request() -> None:
    h = Harness(max_model_len=12)
    h.add("a", toks(100, 10), max_tokens=100)
    plan, _ = h.step()
    assert news(plan) == [("a", 0, 10, [1, 2, 3])]
    plan, _ = h.step()
    assert cached(plan) == [("a", 10, 1, [])]
    assert h.final["a"].finish_reason == LENGTH and len(h.outputs["a"]) == 2
    assert not h.sched.has_unfinished


def test_planning_ahead_of_results_stops_at_the_context() -> None:
    """Async scheduling: plans go out before earlier results return; positions stay in context."""
    h = Harness(max_model_len=12)
    h.add("a", toks(100, 10), max_tokens=100)
    plans = [h.schedule() for _ in range(4)]
    assert news(plans[0]) == [("a", 0, 10, [1, 2, 3])]
    assert [cached(p) for p in plans[1:]] == [[("a", 10, 1, [])], [("a", 11, 1, [])], []]
    results = [h.execute(p) for p in plans]
    assert [r.request_ids for r in results] == [["a"], ["a"], ["a"], []]
    for result in results:
        h.update(result)
    # The third sample (a 13th token) was computed but never reported.
    assert h.outputs["a"] == h.fed["a"][:2] and len(h.fed["a"]) == 3
    assert h.final["a"].finish_reason == LENGTH and not h.sched.has_unfinished


def test_sample_of_a_preempted_and_readmitted_request_from_before_is_dropped() -> None:
    """Two plans ahead: b is preempted and resumed before its old sample comes back."""
    h = Harness(num_blocks=5)
    h.add("a", toks(1, 6), max_tokens=9)
    h.add("b", toks(11, 6), max_tokens=9)
    h.step()
    h.step()  # both hold 8 tokens
    plan_n = h.schedule()
    result_n = h.execute(plan_n)  # b samples its 3rd output; the scheduler has not seen it
    plan_n1 = h.schedule()
    assert plan_n1.finished_request_ids == ["b"] and cached(plan_n1) == [("a", 8, 1, [4])]
    result_n1 = h.execute(plan_n1)
    h.collect(h.sched.abort(["a"]))
    h.sched.check_integrity()
    plan_n2 = h.schedule()
    assert news(plan_n2) == [("b", 4, 4, [3, 4])]  # resumed from 2 outputs, block 3 cached
    result_n2 = h.execute(plan_n2)
    for result in (result_n, result_n1, result_n2):
        h.update(result)
    # The worker's sequence holds the resumed sample, and so must the scheduler's outputs.
    assert h.outputs["b"] == h.worker.seqs["b"].tokens[6:] == [h.fed["b"][i] for i in (0, 1, 3)]
    assert h.sched.requests["b"].num_tokens == 9


# ---------------------------------------------------------------------------- intake


def test_rejections_name_the_cause() -> None:
    h = Harness(max_model_len=16)
    ok = SamplingParams()
    for n in (16, 17):  # a prompt that fills the context leaves no room for an output
        with pytest.raises(RequestRejected, match=f"has {n} tokens but the model's context is 16") as exc:
            h.sched.add_request(AddRequest("long", toks(1, n), ok, [], 0.0))
        assert exc.value.param == "prompt"
    h.sched.add_request(AddRequest("fits", toks(1, 15), ok, [], 0.0))  # leaves room for one token
    cases = [
        (AddRequest("empty", [], ok, [], 0.0), "prompt", "empty"),
        (AddRequest("oov", [1, VOCAB], ok, [], 0.0), "prompt", r"\[0, 1000\)"),
        (AddRequest("neg", [-1, 2], ok, [], 0.0), "prompt", r"\[0, 1000\)"),
        (AddRequest("fits", [1, 2], ok, [], 0.0), "request_id", "already in use"),
        (AddRequest("t", [1], SamplingParams(temperature=3.0), [], 0.0), "temperature", "temperature"),
        (AddRequest("s", [1], SamplingParams(stop_token_ids=[VOCAB]), [], 0.0), "stop_token_ids", "999"),
        (AddRequest("m", [1], SamplingParams(max_tokens=2, min_tokens=3), [], 0.0), "min_tokens", "<="),
    ]
    for msg, param, text in cases:
        with pytest.raises(RequestRejected, match=text) as exc:
            h.sched.add_request(msg)
        assert exc.value.param == param, msg.request_id
        h.sched.check_integrity()
    assert list(h.sched.requests) == ["fits"] and len(h.sched.waiting) == 1


def test_duplicate_id_of_a_running_request_is_rejected() -> None:
    h = Harness()
    h.add("a", toks(1, 4))
    h.step()
    with pytest.raises(RequestRejected) as exc:
        h.add("a", toks(1, 4))
    assert exc.value.param == "request_id"


def test_queue_full_past_max_waiting_requests() -> None:
    h = Harness(max_waiting=2)
    h.add("a", toks(1, 4))
    h.add("b", toks(11, 4))
    with pytest.raises(QueueFull):
        h.add("c", toks(21, 4))
    assert "c" not in h.sched.requests
    h.step()  # a and b start running, which empties the queue
    h.add("c", toks(21, 4))
    assert [r.request_id for r in h.sched.waiting] == ["c"]


# ---------------------------------------------------------------------------- abort and failure


def test_abort_waiting_and_running_requests() -> None:
    h = Harness(max_num_seqs=1)
    h.add("a", toks(1, 6), max_tokens=10)
    h.add("b", toks(11, 6), max_tokens=10)
    h.step()
    assert h.kv.block_ids("a") == [1, 2] and h.kv.usage == 2 / 63

    outs = h.sched.abort(["b", "nobody"])
    h.sched.check_integrity()
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [("b", [], ABORT)]
    plan, _ = h.step()
    assert plan.finished_request_ids == [] and cached(plan) == [("a", 6, 1, [])]

    outs = h.sched.abort(["a"])
    h.sched.check_integrity()
    assert [(o.request_id, o.finish_reason, o.num_prompt_tokens) for o in outs] == [("a", ABORT, 6)]
    assert h.kv.usage == 0 and not h.sched.has_unfinished
    plan = h.schedule()
    assert plan.finished_request_ids == ["a"] and news(plan) == [] and cached(plan) == []
    assert h.sched.abort(["a"]) == []
    assert h.execute(plan).request_ids == [] and h.worker.seqs == {}


def test_abort_with_a_stop_reason() -> None:
    """The detokenizer ends a request on a stop string through the same path."""
    h = Harness()
    h.add("a", toks(1, 4))
    h.step()
    outs = h.sched.abort(["a"], STOP)
    h.sched.check_integrity()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", STOP)]


def test_results_of_a_request_aborted_while_its_step_ran_are_ignored() -> None:
    h = Harness()
    h.add("a", toks(1, 4), max_tokens=5)
    h.add("b", toks(11, 4), max_tokens=5)
    h.step()
    plan = h.schedule()
    result = h.execute(plan)
    assert result.request_ids == ["a", "b"]
    h.collect(h.sched.abort(["a"]))
    h.sched.check_integrity()
    outs = h.update(result)
    assert [o.request_id for o in outs] == ["b"]
    assert h.final["a"].finish_reason == ABORT and h.outputs["a"] == h.fed["a"][:1]
    assert h.outputs["b"] == h.fed["b"]
    plan = h.schedule()
    assert plan.finished_request_ids == ["a"] and cached(plan) == [("b", 5, 1, [])]


def test_results_for_unknown_requests_are_ignored() -> None:
    h = Harness()
    h.add("a", toks(1, 4))
    h.schedule()
    result = StepResult(1, "fake", ["ghost", "a"], np.array([5, 6], dtype=np.int64))
    outs = h.update(result)
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("a", [6])]


def test_fail_step_ends_the_plans_requests_with_the_error() -> None:
    h = Harness(max_num_seqs=2)
    h.add("a", toks(1, 4))
    h.add("b", toks(11, 4))
    h.add("c", toks(21, 4), max_tokens=1)
    plan = h.schedule()
    assert news(plan) == [("a", 0, 4, [1]), ("b", 0, 4, [2])]
    outs = h.sched.fail_step(plan, "worker 0: CUDA out of memory")
    h.sched.check_integrity()
    assert [(o.request_id, o.new_token_ids, o.finish_reason, o.error) for o in outs] == [
        ("a", [], ERROR, "worker 0: CUDA out of memory"),
        ("b", [], ERROR, "worker 0: CUDA out of memory"),
    ]
    assert list(h.sched.requests) == ["c"] and h.sched.fail_step(plan, "again") == []
    plan, _ = h.step()
    assert plan.finished_request_ids == ["a", "b"] and news(plan) == [("c", 0, 4, [3])]
    assert h.final["c"].finish_reason == LENGTH
    assert h.schedule().finished_request_ids == ["c"] and h.kv.usage == 0


def test_failed_step_leaves_no_prefix_cache_hit_on_unwritten_blocks() -> None:
    h = Harness()
    h.add("a", toks(1, 9))
    plan = h.schedule()
    assert news(plan) == [("a", 0, 9, [1, 2, 3])]
    h.sched.fail_step(plan, "worker died")
    h.sched.check_integrity()
    h.add("b", toks(1, 9))  # same prompt: its first two blocks were hashed but never written
    plan, _ = h.step()
    assert [(s.request_id, s.num_computed_tokens) for s in plan.new_seqs] == [("b", 0)]
