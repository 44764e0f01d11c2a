"""How a worker's policy plans its next step: which tokens of which requests run in it.

One loop, no separate prefill phase: each request's computed-token count catches up with its
token count under a per-step token budget. Running requests go first (decodes and unfinished
prefill chunks), then waiting ones are admitted, reusing cached prefix blocks. When blocks run out
the newest running request (lowest priority first under the priority policy) is preempted: its
blocks are freed and it is recomputed later from its prompt plus the outputs it already has, so
no token is lost or repeated. These methods are part of WorkerScheduler (which inherits them);
they live here so planning reads on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from protocol.messages import CachedSeq, NewSeq, StepPlan
from scheduler_svc.prompt_logprobs import MAX_PROMPT_ROWS_PER_STEP, wants_prompt_rows
from scheduler_svc.request import Request, RequestStatus

if TYPE_CHECKING:
    from protocol.config import SchedulerSettings
    from scheduler_svc.kv_cache_manager import KVCacheManager


class StepPlanner:
    """Mixin of WorkerScheduler: the attributes below are WorkerScheduler's."""

    settings: SchedulerSettings
    kv: KVCacheManager
    max_model_len: int
    waiting: list[Request]
    running: list[Request]
    incoming: dict[str, Request]
    _worker_forget: list[str]
    _step_ids: Iterator[int]
    _step_id: int
    _prompt_rows_left: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    # and its method _insert (into a sorted queue)

    def schedule(self) -> StepPlan:
        self._step_id = next(self._step_ids)
        budget = self.settings.max_num_batched_tokens
        new_seqs: list[NewSeq] = []
        cached_seqs: list[CachedSeq] = []
        preemptions_before = self.num_preemptions
        self._prompt_rows_left = MAX_PROMPT_ROWS_PER_STEP
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_uncomputed_tokens, budget, self.max_model_len - req.num_computed_tokens)
            n = self._cap_prompt_rows(req, n)
            if n <= 0 or self._reaches_length_in_flight(req) or (req.prefill_only and req.num_inflight_samples):
                i += 1
                continue
            new_blocks = self._allocate_or_preempt(req, n)
            if new_blocks is None:  # req itself was preempted; it was the tail
                break
            if len(self.running) <= i or self.running[i] is not req:
                raise AssertionError("preemption removed a request ahead of the current one")
            if req.on_worker:
                cached_seqs.append(CachedSeq(req.request_id, new_blocks, req.num_computed_tokens, n))
            else:  # arrived with its KV from another worker: the worker learns it now
                new_seqs.append(self._new_seq(req, n))
            self._advance(req, n)
            budget -= n
            i += 1
        if self.num_preemptions == preemptions_before:  # no admissions in a step that preempted
            budget = self._admit_waiting(budget, new_seqs)
        forget, self._worker_forget = self._worker_forget, []
        return StepPlan(self._step_id, new_seqs, cached_seqs, forget)

    def _reaches_length_in_flight(self, req: Request) -> bool:
        """A sample in flight will end the request on length (max_tokens or the context), so
        computing past it would be wasted: this happens only when planning ahead of results."""
        if req.num_inflight_samples == 0:
            return False
        return (
            req.num_output_tokens + req.num_inflight_samples >= req.params.max_tokens
            or req.num_tokens + req.num_inflight_samples >= self.max_model_len
        )

    def _allocate_or_preempt(self, req: Request, n: int) -> list[int] | None:
        """Blocks for n more tokens of req, preempting from the tail; None if req went itself."""
        while True:
            blocks = self.kv.allocate_slots(
                req.request_id, req.token_ids, n, req.num_computed_tokens
            )
            if blocks is not None:
                return blocks
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_inflight_samples = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        if req.on_worker:
            self._worker_forget.append(req.request_id)
            req.on_worker = False
        self._insert(self.waiting, req)

    def _admit_waiting(self, budget: int, new_seqs: list[NewSeq]) -> int:
        # Sequences whose KV is being copied in hold their slot: they join running when it arrives.
        while self.waiting and budget > 0 and len(self.running) + len(self.incoming) < self.settings.max_num_seqs:
            req = self.waiting[0]
            hit_blocks, num_hit = ([], 0)
            looked_up = self.kv.enable_prefix_caching and not wants_prompt_rows(req)
            if looked_up:
                hit_blocks, num_hit = self.kv.get_computed_blocks(req.request_id, req.token_ids)
            n = self._cap_prompt_rows(req, min(req.num_tokens - num_hit, budget))
            if n <= 0:  # the step's prompt-logprob rows are spent: it waits for the next one
                break
            blocks = self.kv.allocate_slots(
                req.request_id, req.token_ids, n, num_hit, hit_blocks
            )
            if blocks is None:
                break
            self.waiting.pop(0)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                if looked_up:
                    self.prefix_cache_queries += req.num_prompt_tokens
                    self.prefix_cache_hits += num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            new_seqs.append(self._new_seq(req, n))
            self._advance(req, n)
            self._insert(self.running, req)
            budget -= n
        return budget

    def _cap_prompt_rows(self, req: Request, n: int) -> int:
        """n, or fewer for a request whose prompt rows are scored (MAX_PROMPT_ROWS_PER_STEP)."""
        if n <= 0 or not wants_prompt_rows(req):
            return n
        n = min(n, self._prompt_rows_left)
        self._prompt_rows_left -= n
        return n

    def _new_seq(self, req: Request, n: int) -> NewSeq:
        """Everything the worker needs about a request it holds no state for; from this plan on
        it does (samples of older plans are stale)."""
        req.on_worker = True
        req.admitted_step = self._step_id
        return NewSeq(
            request_id=req.request_id,
            token_ids=list(req.token_ids),
            num_prompt_tokens=req.num_prompt_tokens,
            block_ids=self.kv.block_ids(req.request_id),
            num_computed_tokens=req.num_computed_tokens,
            num_scheduled_tokens=n,
            params=req.params,
            eos_token_ids=req.eos_token_ids,
            seed=req.seed,
        )

    def _advance(self, req: Request, n: int) -> None:
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens + req.num_inflight_samples:
            req.num_inflight_samples += 1  # this step samples the next token

