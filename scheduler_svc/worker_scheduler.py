"""Continuous batching for one worker: which tokens of which requests run in the next step.

The central scheduler process (`central.py`) keeps one of these per worker and moves requests
between them: a prefill worker hands a prefilled request (OUTGOING, blocks still held) to a decode
worker (`incoming`: blocks reserved until its KV has been copied), and a dead or draining worker's
requests are adopted elsewhere and recomputed. Step ids come from one counter shared by every
worker, so a sample is recognised as stale wherever its request has moved since.

Planning a step (`schedule`: continuous batching, chunked prefill, preemption) is in
`step_planner.py`, moving requests between workers in `request_moves.py`; this module holds the
requests' intake, their results and the queues. Pure logic: no sockets, no clocks except arrival
times it is given.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator

import numpy as np

from protocol.config import SchedulerSettings
from protocol.messages import (
    AddRequest,
    FinishReason,
    RequestOutput,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.prompt_logprobs import MAX_PROMPT_ROWS_PER_STEP, accept_chunk, take_prompt_logprobs
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.request_moves import RequestMoves, RequestRejected
from scheduler_svc.step_planner import StepPlanner
from scheduler_svc.stop_checker import check_stop


class QueueFull(RuntimeError):
    """The waiting queue is at --max-waiting-requests; the caller should retry later."""


class WorkerScheduler(StepPlanner, RequestMoves):
    def __init__(
        self,
        settings: SchedulerSettings,
        kv: KVCacheManager,
        max_model_len: int,
        vocab_size: int,
        seed: int = 0,
        step_ids: Iterator[int] | None = None,
    ) -> None:
        self.settings = settings
        self.kv = kv
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.by_priority = settings.scheduling_policy == "priority"
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by sort_key
        self.running: list[Request] = []  # sorted by sort_key; the tail is preempted first
        self.outgoing: dict[str, Request] = {}  # prefilled, KV blocks held for a transfer out
        self.incoming: dict[str, Request] = {}  # blocks reserved, KV being copied in
        self.handoffs: list[Request] = []  # became OUTGOING since the caller last took them
        self._worker_forget: list[str] = []
        self._rng = random.Random(seed)
        self._order = 0
        self._step_ids = step_ids if step_ids is not None else itertools.count(1)
        self._step_id = 0
        self._prompt_rows_left = MAX_PROMPT_ROWS_PER_STEP  # reset by every schedule()
        self.num_preemptions = 0
        # Prefix-cache statistics, counted once per request at its first successful admission:
        # a lookup whose allocation fails and is retried, or a recompute after preemption, is
        # not a new query (the KV manager's own counters count every lookup).
        self.prefix_cache_queries = 0  # prompt tokens of admitted requests
        self.prefix_cache_hits = 0  # of those, tokens served from the prefix cache

    # ------------------------------------------------------------------ intake

    def add_request(self, msg: AddRequest, prefill_only: bool = False) -> Request:
        """Queue a request, or raise RequestRejected / QueueFull saying why it cannot be.

        With prefill_only the request leaves this worker after its next sample (`handoffs`)."""
        if msg.request_id in self.requests:
            raise RequestRejected(f"request id {msg.request_id!r} is already in use", "request_id")
        n = len(msg.prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty", "prompt")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {n} tokens but the model's context is {self.max_model_len} "
                f"tokens, which must also hold at least one generated token",
                "prompt",
            )
        if any(t < 0 or t >= self.vocab_size for t in msg.prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        try:
            msg.params.validate(self.vocab_size)
        except ValueError as exc:
            raise RequestRejected(str(exc), getattr(exc, "param", None)) from exc
        bound = self.settings.max_waiting_requests  # the service bounds the whole stack instead
        free = max(0, min(self.settings.max_num_seqs, self.kv.num_usable_blocks) - len(self.running))
        if bound is not None and len(self.waiting) - free >= bound:  # as admission.num_waiting_for_slot
            raise QueueFull(f"{len(self.waiting) - free} requests are waiting for a batch slot already")
        seed = msg.params.seed if msg.params.seed is not None else self._rng.getrandbits(63)
        self._order += 1
        req = Request(
            request_id=msg.request_id,
            prompt_token_ids=list(msg.prompt_token_ids),
            params=msg.params,
            eos_token_ids=list(msg.eos_token_ids),
            arrival_time=msg.arrival_time,
            priority=msg.priority,
            seed=seed,
            order=self._order,
            prefill_only=prefill_only,
        )
        self.requests[req.request_id] = req
        self._insert(self.waiting, req)
        return req

    def _detach(self, req: Request) -> None:
        """Remove a live request from this worker's queues and records (its blocks are the
        caller's to free); the worker is told to forget it if it holds it. A request in
        transfer is held by no worker process here (its record is shared with the other side,
        whose `on_worker` it must not touch)."""
        local = req.request_id not in self.outgoing and req.request_id not in self.incoming
        self._remove_from_queues(req)
        if local and req.on_worker:
            self._worker_forget.append(req.request_id)
            req.on_worker = False
        del self.requests[req.request_id]

    def abort(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> list[RequestOutput]:
        """End these requests now and free their blocks; unknown ids are ignored."""
        outputs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            self._remove_from_queues(req)
            self._finish(req, reason)
            outputs.append(self._output(req, []))
        return outputs

    def _remove_from_queues(self, req: Request) -> None:
        """By membership, not status: mid-transfer one Request is OUTGOING on the source and
        reserved (incoming) on the destination at once."""
        rid = req.request_id
        if rid in self.outgoing:
            del self.outgoing[rid]
            if req in self.handoffs:
                self.handoffs.remove(req)
        elif rid in self.incoming:
            del self.incoming[rid]
        elif req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)

    # ------------------------------------------------------------------ results

    def update(self, result: StepResult) -> list[RequestOutput]:
        """Append sampled tokens, judge stops, and report each request's new tokens."""
        outputs = []
        for chunk in result.prompt_logprobs:
            req = self.requests.get(chunk.request_id)
            if req is not None and req.status == RequestStatus.RUNNING and result.step_id >= req.admitted_step:
                accept_chunk(req, chunk)
        tokens = result.sampled_token_ids.tolist()
        for row, (rid, token) in enumerate(zip(result.request_ids, tokens)):
            req = self.requests.get(rid)
            if (
                req is None
                or req.status != RequestStatus.RUNNING
                or req.num_inflight_samples == 0
                or result.step_id < req.admitted_step
            ):
                # Finished, aborted or preempted while the step ran, or preempted and already
                # re-admitted (the sample belongs to the old incarnation): drop the sample.
                continue
            req.num_inflight_samples -= 1
            if rid in result.request_errors:  # e.g. its grammar failed: end it, drop the token
                self.running.remove(req)
                self._finish(req, FinishReason.ERROR)
                outputs.append(self._output(req, [], error=result.request_errors[rid]))
                continue
            req.token_ids.append(token)
            reason, stop_id = check_stop(
                token, req.num_output_tokens, req.num_tokens, req.params, req.eos_token_ids,
                self.max_model_len,
            )
            logprobs = _logprob_row(result.logprobs, row, req.params.logprobs)
            if reason is not None:
                self.running.remove(req)
                req.stop_token_id = stop_id
                self._finish(req, reason)
            elif req.prefill_only and req.num_inflight_samples == 0:
                self._hand_off(req)
            output = self._output(req, [token], logprobs)
            output.prompt_logprobs = take_prompt_logprobs(req)
            outputs.append(output)
        return outputs

    def fail_step(self, plan: StepPlan, message: str) -> list[RequestOutput]:
        """A worker could not run `plan`: end its requests with an error, keep serving others."""
        ids = [s.request_id for s in plan.new_seqs] + [s.request_id for s in plan.cached_seqs]
        outputs = []
        for rid in ids:
            req = self.requests.get(rid)
            if req is None or req.status == RequestStatus.FINISHED or rid in self.outgoing or rid in self.incoming:
                continue  # in transfer: its KV was written by earlier, successful steps
            self._remove_from_queues(req)
            self._finish(req, FinishReason.ERROR, content_lost=True)
            outputs.append(self._output(req, [], error=message))
        return outputs

    def _finish(self, req: Request, reason: FinishReason, content_lost: bool = False) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.kv.free(req.request_id, content_lost=content_lost)
        if req.on_worker:
            self._worker_forget.append(req.request_id)
            req.on_worker = False
        del self.requests[req.request_id]

    def _output(
        self, req: Request, new_tokens: list[int], logprobs: TokenLogprobs | None = None,
        error: str = "",
    ) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_tokens,
            finish_reason=req.finish_reason,
            stop_token_id=req.stop_token_id,
            logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            error=error,
        )

    # ------------------------------------------------------------------ state

    def _insert(self, queue: list[Request], req: Request) -> None:
        bisect.insort(queue, req, key=lambda r: r.sort_key(self.by_priority))

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def is_empty(self) -> bool:
        """Nothing here at all: no request in any state, nothing for the worker to forget."""
        return not (self.requests or self._worker_forget)

    @property
    def has_pending_forgets(self) -> bool:
        return bool(self._worker_forget)

    def check_integrity(self) -> None:
        """The KV accounting is sound and agrees with the request queues."""
        self.kv.check_integrity()
        for req in self.running:
            assert req.status == RequestStatus.RUNNING, f"{req.request_id} in running as {req.status}"
            covered = len(self.kv.block_ids(req.request_id)) * self.kv.block_size
            assert covered >= req.num_computed_tokens, f"{req.request_id}: blocks cover {covered}"
        for req in self.waiting:
            assert not self.kv.block_ids(req.request_id), f"waiting {req.request_id} holds blocks"
        for rid, req in self.outgoing.items():
            assert req.status == RequestStatus.OUTGOING, f"{rid} outgoing as {req.status}"
        for rid, req in [*self.outgoing.items(), *self.incoming.items()]:
            covered = len(self.kv.block_ids(rid)) * self.kv.block_size
            assert covered >= req.num_tokens - 1, f"{rid} in transfer: blocks cover {covered}"
        assert self.kv.num_requests == len(self.running) + len(self.outgoing) + len(self.incoming), (
            "KV tables != running + transferring requests")
        live = len(self.running) + len(self.waiting) + len(self.outgoing) + len(self.incoming)
        assert live == len(self.requests), f"{len(self.requests)} requests but {live} in queues"
        assert len(self.running) <= self.settings.max_num_seqs


def _logprob_row(lp: TokenLogprobs | None, row: int, k: int | None) -> TokenLogprobs | None:
    if lp is None or k is None:
        return None
    return TokenLogprobs(
        token_ids=np.ascontiguousarray(lp.token_ids[row : row + 1, : k + 1]),
        logprobs=np.ascontiguousarray(lp.logprobs[row : row + 1, : k + 1]),
        ranks=np.ascontiguousarray(lp.ranks[row : row + 1]),
    )
