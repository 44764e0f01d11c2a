"""Test driver of the scheduler policy: a bookkeeping-only worker and a harness around them.

schedule() gives a StepPlan, FakeWorker (no model) decides from the plan which sequences sample
and picks their tokens, and update() takes the StepResult. Block size 4 throughout, so block ids
are easy to read off the token counts. check_integrity() runs after every schedule(), update()
and add().
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from protocol.config import SchedulerSettings
from protocol.messages import AddRequest, FinishReason, RequestOutput, StepPlan, StepResult
from protocol.sampling import SamplingParams
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.worker_scheduler import WorkerScheduler

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
        self.sched = WorkerScheduler(settings, self.kv, self.max_model_len, VOCAB)
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
